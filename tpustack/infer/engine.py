"""Continuous batching: iteration-level scheduling over a paged KV cache (chapter 30.4e).

Each `step` hands a token budget across requests: running ones first (a decoding request
takes 1 token, or k + 1 when speculating with a draft model; a request still prefilling
takes its next chunk of prompt), then waiting ones in arrival order, so a long prompt is prefilled in chunks alongside others'
decoding and there is no separate prefill phase. The step is one jitted call over a
ragged batch (tpustack.infer.paged) padded to a token bucket x sequence bucket, so only
a handful of shapes ever compile.

Request invariant (the decode loop's, per request): its committed tokens are
prompt + output; its pages hold keys/values for tokens[:computed]; it samples a new token
in the step whose chunk reaches the end of its tokens. A preempted request drops its
pages and waits with computed = 0; re-admitted, it recomputes prompt + output (its own
full pages usually come back from the prefix cache) and samples the same next token,
since a token's sampling key depends only on the request's seed and position.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Any, Callable

import jax
import numpy as np

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer.paged import PAGED_DTYPES, blocked_layout, init_pages, paged_step, speculative_paged_step
from tpustack.infer.pages import NULL_PAGE, PagePool
from tpustack.infer.sampling import SamplingParams
from tpustack.kernels import packable, paged_attention_impl
from tpustack.model.transformer import Decoder, pack_for_cpu, unstack_layers


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 256  # including the reserved null page
    max_seqs: int = 16  # sequences per step
    token_budget: int = 64  # tokens per step
    chunk_size: int = 0  # most prompt tokens one request prefills per step; 0: the token budget
    prefix_caching: bool = True
    cache_dtype: str = "float32"
    attention_impl: str = "auto"  # tpustack.kernels impl for paged attention
    # the compiled step shapes; () means powers of two from 1 token / 4 sequences up to the limit (a lone
    # decoding sequence then runs 1 token, not 16: 25 vs 58 ms a step for bench_125m on 2 CPU cores)
    token_buckets: tuple[int, ...] = ()
    seq_buckets: tuple[int, ...] = ()
    max_top_logprobs: int = 0  # the most top_logprobs a request may ask for (0: none)
    # XLA attention (tpustack.infer.paged.blocked_layout): keys per work item, queries per prompt tile
    kv_block: int = 128
    query_tile: int = 32

    def buckets(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(token buckets, sequence buckets), ascending; the last of each is the step's limit."""
        pow2 = lambda lo, hi: tuple(sorted({min(1 << i, hi) for i in range(lo.bit_length() - 1,  # noqa: E731
                                                                           hi.bit_length() + 1)}))
        tokens = tuple(sorted(self.token_buckets)) or pow2(min(1, self.token_budget), self.token_budget)
        seqs = tuple(sorted(self.seq_buckets)) or pow2(min(4, self.max_seqs), self.max_seqs)
        return tokens, seqs

    def check(self) -> None:
        if self.cache_dtype not in PAGED_DTYPES:
            raise UserError(f"cache_dtype {self.cache_dtype!r}: the paged cache takes one of {PAGED_DTYPES}")
        if self.token_budget < self.max_seqs:
            raise UserError(f"token_budget {self.token_budget} < max_seqs {self.max_seqs}: every scheduled "
                            "sequence needs at least one token; raise token_budget")
        if min(self.page_size, self.max_seqs, self.chunk_size + 1, self.kv_block, self.query_tile) < 1 \
                or self.num_pages < 2:
            raise UserError("page_size, max_seqs, kv_block, query_tile >= 1, chunk_size >= 0 and num_pages >= 2 "
                            "are needed")
        tokens, seqs = self.buckets()
        if tokens[-1] < self.token_budget or seqs[-1] < self.max_seqs:
            raise UserError(f"token_buckets {tokens} / seq_buckets {seqs}: the largest must hold token_budget "
                            f"{self.token_budget} / max_seqs {self.max_seqs}")


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    output: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: also the top k
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"
    preemptions: int = 0
    chunks: int = 0  # steps that fed part of the prompt without reaching its end
    speculating: bool = False  # in this step: its pending token plus k draft slots
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    arrival: float = 0.0  # time.monotonic() at add; TTFT and inter-token latencies from token_times
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output


@dataclasses.dataclass
class StepOutput:
    """One request's news from one step: a new token (with its logprobs), and/or its end."""

    id: int
    token: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    preemptions: int = 0
    scheduled_tokens: int = 0
    padded_tokens: int = 0
    drafted: int = 0  # speculative: draft tokens proposed, and accepted by the target
    accepted: int = 0


class Engine:
    """Requests in (`add`), tokens out (`step`): continuous batching over one model."""

    def __init__(self, cfg: ModelConfig, params: Any, engine_cfg: EngineConfig = EngineConfig(),
                 eos_id: int = -1, detokenize: Callable[[list[int]], str] | None = None,
                 draft: tuple[ModelConfig, Any] | None = None, k: int = 4):
        """`draft` = (config, params) of a draft model: decoding requests then speculate k
        tokens a step (tpustack.infer.speculative's rule), in the same ragged step."""
        engine_cfg.check()
        self.cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
        self.params = unstack_layers(params, self.cfg)
        self.draft_cfg, self.k = None, k
        if draft is not None:
            if draft[0].vocab_size != cfg.vocab_size:
                raise UserError(f"--draft: the draft's vocabulary has {draft[0].vocab_size} tokens, the "
                                f"target's {cfg.vocab_size}; they must share one tokenizer")
            if k < 1 or k + 1 > engine_cfg.token_budget:
                raise UserError(f"--speculate-k {k}: must be in 1..token_budget - 1")
            self.draft_cfg = dataclasses.replace(draft[0], scan_layers=False, remat_policy="none",
                                                 max_seq_len=max(draft[0].max_seq_len, cfg.max_seq_len))
            self.params = (self.params, unstack_layers(draft[1], self.draft_cfg))
        elif packable_here(self.cfg):  # the step's variables: float dense weights packed once for the native matmul
            self.params = pack_for_cpu(self.cfg, self.params)
        else:
            self.params = {"params": self.params}
        self.ecfg, self.eos_id, self.detokenize = engine_cfg, eos_id, detokenize
        self.chunk = engine_cfg.chunk_size or engine_cfg.token_budget
        self.pool = PagePool(engine_cfg.num_pages, engine_cfg.page_size, engine_cfg.prefix_caching)
        self.pages = init_pages(self.cfg, engine_cfg.num_pages, engine_cfg.page_size, engine_cfg.cache_dtype)
        if self.draft_cfg is not None:  # the draft's pages share the target's block tables
            self.pages = (self.pages, init_pages(self.draft_cfg, engine_cfg.num_pages, engine_cfg.page_size,
                                                 engine_cfg.cache_dtype))
        # committed to a device, as the step's outputs will be: uncommitted first pages made the
        # first step's shape compile twice (once per commitment), so one warm-up pass was not enough
        self.pages = jax.device_put(self.pages, jax.devices()[0])
        self.max_pages = self.pool.pages_for(self.cfg.max_seq_len)
        self.token_buckets, self.seq_buckets = engine_cfg.buckets()
        # XLA attention runs blocked (each sequence's live pages read once a step); the Pallas
        # kernel reads pages in place from per-token block tables, as the speculative step does;
        # on CPU the one-token rows of a blocked step go to the native kernel where it builds
        self.attention = paged_attention_impl(engine_cfg.page_size, self.cfg.heads_dim, self.cfg.dtype,
                                              engine_cfg.attention_impl, page_dtype=engine_cfg.cache_dtype)
        self.blocked = self.draft_cfg is None and self.attention != "pallas"
        if self.draft_cfg is None:
            self._step = _jitted_step(self.cfg, engine_cfg.attention_impl, engine_cfg.max_top_logprobs)
        else:
            self._step = _jitted_speculative_step(self.cfg, self.draft_cfg, engine_cfg.attention_impl, k)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[int, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------

    def add(self, prompt: list[int], max_tokens: int, sampling: SamplingParams | None = None,
            stop_token_ids=(), stop=(), logprobs: int | None = None) -> int:
        """Queue a request; returns its id."""
        sampling = sampling or SamplingParams()
        sampling.check()
        if logprobs is not None and self.draft_cfg is not None:
            raise UserError("logprobs: not available with speculative decoding; serve without --draft")
        if logprobs is not None and not 0 <= logprobs <= self.ecfg.max_top_logprobs:
            raise UserError(f"top_logprobs {logprobs}: this engine returns 0..{self.ecfg.max_top_logprobs}")
        limit = self.cfg.max_seq_len
        if not prompt:
            raise UserError("prompt: is empty; give at least one token")
        if min(prompt) < 0 or max(prompt) >= self.cfg.vocab_size:
            raise UserError(f"prompt: token ids must be in [0, {self.cfg.vocab_size})")
        if max_tokens < 1 or len(prompt) + max_tokens > limit:
            raise UserError(f"max_tokens {max_tokens}: with a {len(prompt)}-token prompt the model's context "
                            f"({limit}) allows 1..{max(limit - len(prompt), 0)}")
        extra = 0 if self.draft_cfg is None else self.k  # a speculating request writes k slots ahead
        if self.pool.pages_for(len(prompt) + max_tokens + extra) > self.pool.capacity:
            raise UserError(f"max_tokens {max_tokens}: prompt + output need more than the pool's "
                            f"{self.pool.capacity} pages; ask for fewer tokens or give the engine more pages")
        req = Request(next(self._ids), list(prompt), max_tokens, sampling,
                      frozenset(stop_token_ids), tuple(stop), logprobs=logprobs, arrival=time.monotonic())
        self.requests[req.id] = req
        self.waiting.append(req)
        return req.id

    def cancel(self, rid: int) -> None:
        """Stop a request now and free its pages."""
        req = self.requests.get(rid)
        if req is None or req.finish_reason is not None:
            return
        if req in self.running:
            self.running.remove(req)
            self.pool.release(rid)
        else:
            self.waiting.remove(req)
        req.finish_reason = "cancelled"
        req.finish_time = time.monotonic()

    def forget(self, rid: int) -> Request:
        """Drop a finished request's record (a long-running server must, or `requests` grows)."""
        if self.requests[rid].finish_reason is None:
            raise ValueError(f"request {rid} is still running; cancel it first")
        return self.requests.pop(rid)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling -----------------------------------------------------------------

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.pool.release(req.id)
        req.computed = 0
        req.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(req)

    def schedule(self) -> list[tuple[Request, int]]:
        """This step's (request, tokens to feed): running first, then waiting, within the budget."""
        budget, batch, preempted = self.ecfg.token_budget, [], False
        i = 0
        while i < len(self.running) and budget > 0 and len(batch) < self.ecfg.max_seqs:
            req = self.running[i]
            n = self._tokens_for(req, budget)
            while not self.pool.grow(req.id, req.computed + n):
                preempted = True
                victim = self.running[-1]  # the latest arrival yields its pages
                self._preempt(victim)
                if victim is req:
                    break
            if req not in self.running:
                break
            batch.append((req, n))
            budget -= n
            i += 1
        while (not preempted and self.waiting and budget > 0 and len(batch) < self.ecfg.max_seqs):
            req = self.waiting[0]
            computed = self.pool.admit(req.id, req.tokens)
            req.computed = computed
            n = self._tokens_for(req, budget)
            if not self.pool.grow(req.id, computed + n):
                self.pool.release(req.id)
                break
            self.waiting.popleft()
            self.running.append(req)
            batch.append((req, n))
            budget -= n
        return batch

    def _tokens_for(self, req: Request, budget: int) -> int:
        """Step slots for req: its next prompt chunk, its pending token, or (speculating)
        the pending token plus k draft slots. The first output token is never speculated,
        as in SpeculativeGenerator, so seeded requests draw the same keys."""
        left = len(req.tokens) - req.computed
        req.speculating = (self.draft_cfg is not None and left == 1 and bool(req.output)
                           and budget > self.k and len(req.tokens) + self.k <= self.cfg.max_seq_len)
        return self.k + 1 if req.speculating else min(left, budget, self.chunk)

    def _arrays(self, batch: list[tuple[Request, int]]) -> tuple:
        """Pad the batch to its (tokens, sequences) bucket; sequence row S is all-null for padding."""
        used = sum(n for _, n in batch)
        t = next(b for b in self.token_buckets if b >= used)
        s = next(b for b in self.seq_buckets if b >= len(batch))
        tokens, positions = np.zeros(t, np.int32), np.zeros(t, np.int32)
        seq = np.full(t, s, np.int32)
        tables = None if self.blocked else np.full((s + 1, self.max_pages), NULL_PAGE, np.int32)
        rows = []
        last, spec = np.zeros(s, np.int32), np.zeros(s, bool)
        temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
        top_k, seed = np.zeros(s, np.int32), np.zeros(s, np.uint32)
        at = 0
        for row, (req, n) in enumerate(batch):
            toks = req.tokens
            tokens[at:at + n] = toks[req.computed:req.computed + n] if not req.speculating else toks[-1]
            positions[at:at + n] = np.arange(req.computed, req.computed + n)
            seq[at:at + n] = row
            table = self.pool.table(req.id)
            if self.blocked:
                rows.append((at, n, req.computed, table))
            else:
                tables[row, :len(table)] = table
            last[row] = at if req.speculating else at + n - 1  # speculating: the pending token's slot
            spec[row] = req.speculating
            sp = req.sampling
            temperature[row], top_k[row], top_p[row], seed[row] = sp.temperature, sp.top_k, sp.top_p, sp.seed
            at += n
        self.stats.scheduled_tokens += used
        self.stats.padded_tokens += t - used
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed}
        if self.blocked:  # the layout replaces seq and tables
            layout = blocked_layout(rows, t, s, self.ecfg.page_size, self.ecfg.kv_block, self.ecfg.query_tile,
                                    self.cfg.max_seq_len, native=self.attention == "cpu")
            return tokens, positions, None, None, last, sampling, layout
        if self.draft_cfg is None:
            return tokens, positions, seq, tables, last, sampling, None
        return tokens, positions, seq, tables, last, spec, sampling

    def step(self) -> list[StepOutput]:
        """One iteration: schedule, run the model once, commit; what each request produced."""
        batch = self.schedule()
        if not batch:
            return []
        arrays = jax.device_put(self._arrays(batch))  # one transfer call for the step's inputs
        out, self.pages = self._step(self.params, self.pages, *arrays)
        out = {k: np.asarray(v) for k, v in out.items()}
        now = time.monotonic()
        self.stats.steps += 1
        events = []
        for row, (req, n) in enumerate(batch):
            if req.speculating:  # the pending token and the accepted drafts are now computed
                count = int(out["count"][row])
                new = out["tokens"][row, :count].tolist()
                req.computed += count
                self.stats.drafted += self.k
                self.stats.accepted += int(out["accepted"][row])
            else:
                req.computed += n
                self.pool.commit(req.id, req.tokens, req.computed)
                if req.computed < len(req.tokens):
                    req.chunks += 1
                    continue  # mid-prompt chunk: nothing sampled yet
                new = [int(out["next"][row] if "next" in out else out["tokens"][row, 0])]
            for token in new:
                event = self._append(req, token, out, row, now)
                events.append(event)
                if event.finish_reason is not None:
                    self.running.remove(req)
                    self.pool.release(req.id)
                    break
            else:
                self.pool.commit(req.id, req.tokens, req.computed)
        return events

    def _append(self, req: Request, token: int, out: dict, row: int, now: float) -> StepOutput:
        """Commit one output token (with its logprobs) and check the request's stops."""
        req.output.append(token)
        req.token_times.append(now)
        event = StepOutput(req.id, token)
        if req.logprobs is not None:
            event.logprob = float(out["logprob"][row])
            req.output_logprobs.append(event.logprob)
            if req.logprobs:
                event.top = [(int(i), float(lp)) for i, lp in
                             zip(out["top_ids"][row, :req.logprobs], out["top_logprobs"][row, :req.logprobs])]
                req.output_top.append(event.top)
        reason = self._finished(req)
        if reason is not None:
            req.finish_reason, req.finish_time, event.finish_reason = reason, now, reason
        return event

    def _finished(self, req: Request) -> str | None:
        token = req.output[-1]
        if token == self.eos_id or token in req.stop_token_ids:
            return "stop"
        if req.stop and self.detokenize is not None:
            text = self.detokenize(req.output)
            if any(s in text for s in req.stop):
                return "stop"
        if len(req.output) >= req.max_tokens:
            return "length"
        return None

    def run(self) -> None:
        """Step until every request has finished."""
        while self.has_work():
            self.step()

    def generate(self, prompts: list[list[int]], max_tokens: int | list[int],
                 sampling: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """All prompts at once through the engine; each request's output tokens."""
        n = len(prompts)
        max_new = [max_tokens] * n if isinstance(max_tokens, int) else list(max_tokens)
        params = sampling if isinstance(sampling, list) else [sampling] * n
        ids = [self.add(p, m, s) for p, m, s in zip(prompts, max_new, params)]
        self.run()
        return [self.forget(i).output for i in ids]

    def compiled_shapes(self) -> int:
        """Shapes compiled so far by every engine on this model config (a test checks that
        none are added once warm)."""
        return self._step._cache_size()


def packable_here(cfg: ModelConfig) -> bool:
    """Whether an engine packs its dense weights once for the native CPU matmul: model.decode_kernels
    auto, float weights, and a CPU backend where the kernel builds. A decode step's [64, 768] x
    [768, 2048] ran at 222 GFLOP/s on XLA's dot, 292 packed (docs/kernels.md, same process)."""
    return cfg.decode_kernels == "auto" and cfg.weight_quant == "none" and packable(cfg.dtype) is None


@functools.lru_cache(maxsize=16)
def _jitted_step(cfg: ModelConfig, impl: str, top_logprobs: int) -> Callable:
    """One jitted step per (model config, attention impl, top logprobs): engines on the same
    model share compiled shapes. The pages are donated: the step updates them in place."""
    model = Decoder(cfg)
    def step(variables, pages, tokens, positions, seq, tables, last, sampling, layout):
        return paged_step(model, variables, pages, tokens, positions, seq, tables, last, sampling, impl=impl,
                          top_logprobs=top_logprobs, layout=layout)
    return jax.jit(step, donate_argnums=(1,))


@functools.lru_cache(maxsize=16)
def _jitted_speculative_step(cfg: ModelConfig, draft_cfg: ModelConfig, impl: str, k: int) -> Callable:
    """The step with a draft model (speculative_paged_step); pages of both models donated."""
    target, draft = Decoder(cfg), Decoder(draft_cfg)
    return jax.jit(lambda params, pages, *args: speculative_paged_step(target, draft, params, pages, *args,
                                                                       k=k, impl=impl),
                   donate_argnums=(1,))
