"""The page pool: a seeded random driver of arrivals, growth, cancellations and preemptions."""

import numpy as np
import pytest

from tpustack.infer.pages import NULL_PAGE, PagePool


class Sim:
    """Requests over a PagePool, with a model of what each page holds to check sharing."""

    def __init__(self, pool: PagePool, rng: np.random.Generator):
        self.pool, self.rng = pool, rng
        self.tokens: dict[int, list[int]] = {}  # request -> committed tokens
        self.computed: dict[int, int] = {}  # request -> tokens whose K/V are in its pages
        self.content: dict[int, list] = {}  # page -> token held in each slot
        self.preempted: list[int] = []
        self.next_id = 0

    def arrive(self, prompt: list[int]) -> None:
        rid = self.next_id
        self.next_id += 1
        self.tokens[rid] = list(prompt)
        self._admit(rid)

    def _admit(self, rid: int) -> None:
        done = self.pool.admit(rid, self.tokens[rid])
        assert done % self.pool.page_size == 0 and done < len(self.tokens[rid])
        self.computed[rid] = done
        self._check_view(rid)

    def _check_view(self, rid: int) -> None:
        """Every computed token reads back from the request's own pages."""
        L, table = self.pool.page_size, self.pool.table(rid)
        for t in range(self.computed[rid]):
            assert self.content[table[t // L]][t % L] == self.tokens[rid][t], (rid, t)

    def compute(self, rid: int, n: int) -> bool:
        """Compute the next n tokens: grow the table, write them, commit full pages."""
        start = self.computed[rid]
        n = min(n, len(self.tokens[rid]) - start)
        if not self.pool.grow(rid, start + n):
            return False
        L, table = self.pool.page_size, self.pool.table(rid)
        for t in range(start, start + n):
            page = table[t // L]
            assert page != NULL_PAGE and self.pool.refcount[page] == 1, "writing into a shared page"
            self.content.setdefault(page, [None] * L)[t % L] = self.tokens[rid][t]
        self.computed[rid] = start + n
        self.pool.commit(rid, self.tokens[rid], self.computed[rid])
        if self.computed[rid] == len(self.tokens[rid]):
            self.tokens[rid].append(int(self.rng.integers(0, 5)))  # a sampled token
        self._check_view(rid)
        return True

    def end(self, rid: int) -> None:  # finished or cancelled
        self.pool.release(rid)
        del self.tokens[rid], self.computed[rid]

    def preempt(self, rid: int) -> None:
        self.pool.release(rid)
        self.preempted.append(rid)

    def readmit(self) -> None:
        self._admit(self.preempted.pop(0))


@pytest.mark.parametrize("seed,page_size,num_pages,caching", [
    (0, 4, 24, True), (1, 3, 40, True), (2, 1, 16, True), (3, 4, 24, False), (4, 8, 12, True)])
def test_random_arrivals_growth_cancellations_preemptions(seed, page_size, num_pages, caching):
    rng = np.random.default_rng(seed)
    pool = PagePool(num_pages, page_size, prefix_caching=caching)
    sim = Sim(pool, rng)
    prefixes = [rng.integers(0, 5, int(rng.integers(1, 20))).tolist() for _ in range(4)]
    preemptions = 0
    for step in range(3000):
        event = rng.random()
        running = [r for r in sim.tokens if r not in sim.preempted]
        if event < 0.15 and len(running) < 8:
            prompt = prefixes[int(rng.integers(0, 4))] + rng.integers(0, 5, int(rng.integers(1, 8))).tolist()
            sim.arrive(prompt)
        elif event < 0.25 and sim.preempted and pool.available() > 2:
            sim.readmit()
        elif event < 0.75 and running:
            rid = running[int(rng.integers(0, len(running)))]
            if not sim.compute(rid, int(rng.integers(1, 2 * page_size + 2))):
                victim = running[-1]  # out of pages: preempt the latest arrival, recompute later
                sim.preempt(victim)
                preemptions += 1
        elif event < 0.9 and running:
            sim.end(running[int(rng.integers(0, len(running)))])
        elif running:
            sim.preempt(running[0])
            preemptions += 1
        pool.check()
    assert preemptions > 10
    if caching:
        assert pool.stats.prefix_hits > 10
    else:
        assert pool.stats.prefix_queries == 0
    for rid in list(sim.preempted):
        sim.readmit()
    sim.preempted.clear()
    for rid in list(sim.tokens):
        sim.end(rid)
    pool.check()
    assert pool.available() == pool.capacity and pool.in_use() == 0
    assert all(c == 0 for c in pool.refcount)


def test_prefix_pages_are_shared_and_evicted_lru_only_at_refcount_zero():
    pool = PagePool(num_pages=7, page_size=2)  # 6 usable pages
    prompt = [1, 2, 3, 4, 5]
    assert pool.admit("a", prompt) == 0
    assert pool.grow("a", 5)
    pool.commit("a", prompt, 5)  # pages for [1,2] and [3,4] are keyed; [5] is partial
    a_pages = pool.table("a")
    assert pool.admit("b", prompt + [9]) == 4  # both full pages hit
    assert pool.table("b") == a_pages[:2] and pool.refcount[a_pages[0]] == 2
    assert pool.admit("c", [1, 2, 7, 7, 7]) == 2  # only the first page: keys chain on the parent
    assert pool.admit("d", [3, 4, 3, 4, 1]) == 0  # same tokens as a's page 2, different parent
    pool.release("a"), pool.release("b"), pool.release("c"), pool.release("d")
    pool.check()
    assert len(pool.lru) == 2 and pool.available() == 6
    # the cached pages are reused before eviction, and evicted only when the free list is empty
    assert pool.admit("e", prompt) == 4 and len(pool.lru) == 0
    assert pool.grow("e", 12)  # 6 pages in all: 4 fresh from the free list
    assert not pool.grow("e", 13) and len(pool.table("e")) == 6  # a 7th page does not exist
    pool.release("e")
    assert pool.admit("f", [8] * 12) == 0 and pool.grow("f", 12)  # 6 pages: evicts both keyed pages
    assert pool.stats.evictions == 2 and pool.admit("g", prompt) == 0
    pool.release("f"), pool.release("g")
    pool.check()
    assert pool.available() == pool.capacity
