"""The page pool behind the serving engine's KV cache: pure Python, no jax.

The cache is P pages of L token slots each. A request owns a block table (its pages in
order): its token t lives in page table[t // L], slot t % L. Pages are reference-counted,
so one page can back the same prefix of many requests.

Prefix caching: once all L tokens of a request's page are computed, the page is keyed by
hash(parent page's key, its L tokens), so a key names a whole prefix, not just one page's
tokens. A new request walks its prompt page by page and reuses every page whose key is
known. A page whose refcount drops to 0 keeps its key and waits in an LRU list; it is
evicted (its key forgotten) only when the free list is empty and a fresh page is needed.

Page 0 is never handed out: the engine's padding tokens write there.

Invariants (checked by `check`, exercised by tests/test_pages.py): every page is in
exactly one of {null page, free list, LRU list, owned (refcount > 0)}; a page's refcount
equals the number of block tables that hold it; a keyed page is the one page under its key.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib

import numpy as np

NULL_PAGE = 0


def page_key(parent: bytes, tokens) -> bytes:
    """The prefix-cache key of a full page: a digest of its parent's key and its tokens."""
    return hashlib.blake2b(parent + np.asarray(tokens, np.int64).tobytes(), digest_size=16).digest()


@dataclasses.dataclass
class PoolStats:
    prefix_queries: int = 0  # full prompt pages looked up in the prefix cache
    prefix_hits: int = 0  # of those, found
    evictions: int = 0  # keyed pages whose key was dropped to reuse the page

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class PagePool:
    """Pages, a free list, per-request block tables, refcounts and the prefix cache."""

    def __init__(self, num_pages: int, page_size: int, prefix_caching: bool = True):
        if num_pages < 2 or page_size < 1:
            raise ValueError(f"need >= 2 pages (page 0 is reserved) and page_size >= 1; got {num_pages}, {page_size}")
        self.num_pages, self.page_size, self.prefix_caching = num_pages, page_size, prefix_caching
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.lru: collections.OrderedDict[int, None] = collections.OrderedDict()  # refcount-0 keyed pages
        self.refcount = [0] * num_pages
        self.key_of: dict[int, bytes] = {}  # page -> its key
        self.page_of: dict[bytes, int] = {}  # key -> page
        self.tables: dict[object, list[int]] = {}  # request id -> block table
        self.keyed: dict[object, tuple[int, bytes]] = {}  # request id -> (leading pages keyed, last key)
        self.stats = PoolStats()

    @property
    def capacity(self) -> int:
        """Pages that can ever be handed out (all but the null page)."""
        return self.num_pages - 1

    def available(self) -> int:
        """Pages a request could get now: free ones plus evictable cached ones."""
        return len(self.free) + len(self.lru)

    def in_use(self) -> int:
        return self.capacity - self.available()

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def table(self, rid) -> list[int]:
        return self.tables[rid]

    def _take(self, page: int) -> None:
        if self.refcount[page] == 0:
            self.lru.pop(page, None)
        self.refcount[page] += 1

    def _fresh(self) -> int:
        if self.free:
            page = self.free.popleft()
        else:  # evict the least recently used cached page
            page, _ = self.lru.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
            self.stats.evictions += 1
        self.refcount[page] = 1
        return page

    def admit(self, rid, prompt: list[int]) -> int:
        """Open a block table for `rid` holding the cached pages of its prompt's prefix.

        Returns how many tokens are already computed (a multiple of the page size). The
        last prompt token is never taken from the cache: its logits are still needed.
        """
        if rid in self.tables:
            raise ValueError(f"request {rid!r} already holds pages")
        table, parent = [], b""
        if self.prefix_caching:
            for i in range((len(prompt) - 1) // self.page_size):
                key = page_key(parent, prompt[i * self.page_size:(i + 1) * self.page_size])
                self.stats.prefix_queries += 1
                page = self.page_of.get(key)
                if page is None:
                    break
                self.stats.prefix_hits += 1
                self._take(page)
                table.append(page)
                parent = key
        self.tables[rid] = table
        self.keyed[rid] = (len(table), parent)
        return len(table) * self.page_size

    def grow(self, rid, tokens: int) -> bool:
        """Make rid's table hold `tokens` slots; False (nothing taken) if pages run out."""
        table = self.tables[rid]
        need = self.pages_for(tokens) - len(table)
        if need <= 0:
            return True
        if need > self.available():
            return False
        table.extend(self._fresh() for _ in range(need))
        return True

    def commit(self, rid, tokens: list[int], computed: int) -> None:
        """Key rid's pages that are now full of computed tokens (tokens[:computed])."""
        if not self.prefix_caching:
            return
        table, L = self.tables[rid], self.page_size
        done, parent = self.keyed[rid]
        for i in range(done, min(computed // L, len(table))):
            key = page_key(parent, tokens[i * L:(i + 1) * L])
            page = table[i]
            if key not in self.page_of and page not in self.key_of:
                self.page_of[key], self.key_of[page] = page, key
            # else: another request computed the same prefix first; ours stays unkeyed
            parent = key
            done = i + 1
        self.keyed[rid] = (done, parent)

    def release(self, rid) -> None:
        """Drop rid's block table (finished, cancelled or preempted): refcounts fall, and
        pages nobody holds go back to the free list, or to the LRU list if keyed."""
        for page in reversed(self.tables.pop(rid)):  # tail pages first: evicted before their prefix
            self.refcount[page] -= 1
            if self.refcount[page] == 0:
                if page in self.key_of:
                    self.lru[page] = None
                else:
                    self.free.append(page)
        del self.keyed[rid]

    def check(self) -> None:
        """Assert the invariants in the module docstring (tests call this after every event)."""
        owners = collections.Counter(p for t in self.tables.values() for p in t)
        assert NULL_PAGE not in owners and self.refcount[NULL_PAGE] == 0
        free, lru = set(self.free), set(self.lru)
        assert len(free) == len(self.free), "a page is on the free list twice"
        assert not free & lru and not free & set(owners) and not lru & set(owners)
        assert len(free) + len(lru) + len(owners) == self.capacity, "a page is lost or counted twice"
        for page in range(1, self.num_pages):
            assert self.refcount[page] == owners.get(page, 0), f"page {page}: refcount {self.refcount[page]}"
        assert all(p in self.key_of for p in lru) and not any(p in self.key_of for p in free)
        assert {self.page_of[k]: k for k in self.page_of} == self.key_of
        for table in self.tables.values():
            assert len(set(table)) == len(table), "a table holds one page twice"
