"""The one decode loop: prefill, then rounds inside a single jitted while_loop.

A *round* turns each row's pending token into one or more committed tokens: plain
decoding commits one (feed the pending token, sample the next); speculative decoding
(tpustack.infer.speculative) commits up to k + 1. Everything else is shared: EOS and
max-token stopping per row, the output buffer, positions, chunked calls for streaming.

State invariant: a row's committed tokens are prompt + out[:count]; its caches hold keys
and values for every position before `pos`; `pending` (the last committed token, at
position `pos`) has not been fed yet. Slots at or after `pos` are stale and masked, so
rolling back a rejected draft is just not advancing `pos`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer.cache import init_cache
from tpustack.infer.sampling import SamplingParams, sample_tokens, stack_params
from tpustack.mesh import batch_divisor, check_divisible, kv_cache_sharding, mesh_context, param_shardings, rules_for
from tpustack.model.transformer import Decoder, unstack_layers


def bucket(n: int, minimum: int = 16) -> int:
    """Round up to a power of two (>= minimum): a handful of shapes, so few compiles."""
    return max(minimum, 1 << max(n - 1, 0).bit_length())


@struct.dataclass
class DecodeState:
    caches: Any  # per model: a tuple of LayerCaches
    pending_B: jax.Array
    pos_B: jax.Array
    out_BN: jax.Array
    count_B: jax.Array
    done_B: jax.Array
    max_new_B: jax.Array
    drafted_B: jax.Array  # speculative statistics (zero for plain decoding)
    accepted_B: jax.Array
    rejected_B: jax.Array  # rounds that stopped at a rejected draft (fewer than k accepted)


def commit(state: DecodeState, new_BR: jax.Array, n_B: jax.Array, eos_id: int) -> DecodeState:
    """Append each row's first n_B tokens of new_BR, stopping at EOS or max tokens."""
    r = jnp.arange(new_BR.shape[1])[None, :]
    index_BR = state.count_B[:, None] + r
    is_eos_BR = new_BR == eos_id
    before_eos_BR = (jnp.cumsum(is_eos_BR, axis=1) - is_eos_BR) == 0  # up to and including the first EOS
    valid_BR = (r < n_B[:, None]) & ~state.done_B[:, None] & (index_BR < state.max_new_B[:, None]) & before_eos_BR
    rows_BR = jnp.broadcast_to(jnp.arange(new_BR.shape[0])[:, None], new_BR.shape)
    out_BN = state.out_BN.at[rows_BR, jnp.where(valid_BR, index_BR, state.out_BN.shape[1])].set(
        new_BR, mode="drop")
    count_B = state.count_B + jnp.sum(valid_BR, axis=1)
    done_B = state.done_B | jnp.any(valid_BR & is_eos_BR, axis=1) | (count_B >= state.max_new_B)
    last_B = jnp.take_along_axis(new_BR, jnp.maximum(n_B - 1, 0)[:, None], axis=1)[:, 0]
    advance_B = jnp.where(state.done_B, 0, n_B)
    return state.replace(out_BN=out_BN, count_B=count_B, done_B=done_B,
                         pending_B=jnp.where(state.done_B, state.pending_B, last_B),
                         pos_B=state.pos_B + advance_B)


def _prefill(models: tuple[Decoder, ...], params: tuple, tokens_BT, lengths_B, caches, sampling, max_new_B,
             out_len: int, eos_id: int) -> DecodeState:
    """Run the padded prompts once through every model (target, draft), fill their caches,
    and sample the first token from the target (models[0])."""
    b, t = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(t), (b, t))
    filled = []
    for model, p, cache in zip(models, params, caches):
        # logits at each prompt's last token only: [B, T, V] of 64 x 2048-token prompts is 16.8 GB in f32
        logits, cache = model.apply({"params": p}, tokens_BT, positions_BT, cache=cache, prefill=True,
                                    select_BS=(lengths_B - 1)[:, None])
        filled.append(cache)
        if len(filled) == 1:
            last_BV = logits[:, 0]
    first_B = sample_tokens(last_BV, sampling, lengths_B)
    zeros = jnp.zeros((b,), jnp.int32)
    state = DecodeState(caches=tuple(filled), pending_B=first_B, pos_B=lengths_B - 1,
                        out_BN=jnp.zeros((b, out_len), jnp.int32), count_B=zeros, done_B=max_new_B <= 0,
                        max_new_B=max_new_B, drafted_B=zeros, accepted_B=zeros, rejected_B=zeros)
    return commit(state, first_B[:, None], jnp.ones((b,), jnp.int32), eos_id)


def plain_round(model: Decoder, params, state: DecodeState, sampling) -> tuple[jax.Array, jax.Array, DecodeState]:
    """Feed the pending token, sample one more: (tokens [B, 1], counts [B], state)."""
    logits_BTV, cache = model.apply({"params": params}, state.pending_B[:, None], state.pos_B[:, None],
                                    cache=state.caches[0])
    next_B = sample_tokens(logits_BTV[:, 0], sampling, state.pos_B + 1)
    return next_B[:, None], jnp.ones_like(next_B), state.replace(caches=(cache, *state.caches[1:]))


def decode_rounds(round_fn: Callable, state: DecodeState, max_rounds: int, eos_id: int) -> DecodeState:
    """Up to max_rounds rounds, stopping early once every row is done; no Python per token."""
    def cond(carry):
        i, s = carry
        return (i < max_rounds) & ~jnp.all(s.done_B)

    def body(carry):
        i, s = carry
        new_BR, n_B, s = round_fn(s)
        return i + 1, commit(s, new_BR, n_B, eos_id)

    return jax.lax.while_loop(cond, body, (jnp.asarray(0), state))[1]


@dataclasses.dataclass
class Generator:
    """Jitted prefill and decode for one model; `generate` is the entry point."""

    cfg: ModelConfig
    params: Any
    cache_dtype: str = "float32"
    eos_id: int = -1
    mesh: Mesh | None = None  # None: one device; else params, caches and batch are sharded
    rules: str = "default"

    def __post_init__(self):
        self.cfg = dataclasses.replace(self.cfg, scan_layers=False, remat_policy="none", **self._decode_kernels())
        self.params = self.place(unstack_layers(self.params, self.cfg), self.cfg)
        self.model = Decoder(self.cfg)
        self._prefill = jax.jit(
            lambda params, tokens, lengths, caches, sampling, max_new, out_len: _prefill(
                self.models(), params, tokens, lengths, caches, sampling, max_new, out_len, self.eos_id),
            static_argnums=(6,), donate_argnums=(3,))
        self._decode = jax.jit(
            lambda params, state, sampling, max_rounds: decode_rounds(
                lambda s: self.round(params, s, sampling), state, max_rounds, self.eos_id),
            static_argnums=(3,), donate_argnums=(1,))

    def place(self, params: Any, cfg: ModelConfig) -> Any:
        """Shard params by the rules table (FSDP / tensor) when decoding on a mesh."""
        if self.mesh is None:
            return params
        check_divisible(params, jax.tree.map(lambda s: s.spec, param_shardings(cfg, self.mesh, self._rules())),
                        self.mesh)
        return jax.device_put(params, param_shardings(cfg, self.mesh, self._rules()))

    def _decode_kernels(self) -> dict:
        """Sharded weights stay on XLA's dots: a native kernel sees whole arrays (SPMD would gather them)."""
        return {} if self.mesh is None else {"decode_kernels": "xla"}

    def _rules(self):
        return rules_for(self.rules)

    def place_cache(self, caches: tuple) -> tuple:
        """Caches sharded like the model: batch over data x fsdp, kv heads over tensor."""
        if self.mesh is None:
            return caches
        return jax.tree.map(lambda x: jax.device_put(x, kv_cache_sharding(self.mesh, self._rules(), x.ndim)),
                            caches)

    def _context(self):
        return mesh_context(self.mesh, self._rules()) if self.mesh is not None else contextlib.nullcontext()

    # What a subclass (speculative decoding) changes: its models, caches and round.
    def models(self) -> tuple[Decoder, ...]:
        return (self.model,)

    def all_params(self) -> tuple:
        return (self.params,)

    def new_caches(self, batch: int, length: int) -> tuple:
        return (self.place_cache(init_cache(self.cfg, batch, length, self.cache_dtype)),)

    def extra_positions(self) -> int:
        """Cache slots a round may write past the last committed token."""
        return 0

    def round(self, params: tuple, state: DecodeState, sampling) -> tuple[jax.Array, jax.Array, DecodeState]:
        return plain_round(self.model, params[0], state, sampling)

    def check_request(self, prompts: list[list[int]], max_new_tokens: list[int], extra: int = 0) -> None:
        limit = self.cfg.max_seq_len
        for i, (p, n) in enumerate(zip(prompts, max_new_tokens)):
            if not p:
                raise UserError(f"prompt {i}: is empty; give at least one token")
            if len(p) >= limit:
                raise UserError(f"prompt {i}: {len(p)} tokens, but the model's context is {limit}; "
                                f"shorten it to at most {limit - 1}")
            if n < 1 or len(p) + n + extra > limit:
                raise UserError(f"max_new_tokens {n}: with a {len(p)}-token prompt the cache holds "
                                f"{limit} positions; ask for at most {limit - len(p) - extra}")
            if max(p) >= self.cfg.vocab_size or min(p) < 0:
                raise UserError(f"prompt {i}: token ids must be in [0, {self.cfg.vocab_size})")

    def start(self, prompts: list[list[int]], max_new_tokens: list[int],
              sampling: list[SamplingParams]) -> DecodeState:
        """Prefill: pad prompts to a length bucket, allocate caches, sample the first tokens."""
        stacked = stack_params(sampling)  # validates the sampling parameters first
        extra = self.extra_positions()
        self.check_request(prompts, max_new_tokens, extra)
        b = len(prompts)
        if self.mesh is not None and b % batch_divisor(self.mesh, self._rules()):
            raise UserError(f"batch {b}: not divisible by the mesh's {batch_divisor(self.mesh, self._rules())} "
                            f"batch shards; send a multiple of it or decode on fewer devices")
        t = bucket(max(len(p) for p in prompts))
        s = min(bucket(max(len(p) + n for p, n in zip(prompts, max_new_tokens)) + extra), self.cfg.max_seq_len)
        s = max(s, t)
        tokens = np.zeros((b, t), np.int32)
        for row, p in enumerate(prompts):
            tokens[row, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        with self._context():
            return self._prefill(self.all_params(), jnp.asarray(tokens), lengths, self.new_caches(b, s),
                                 stacked, jnp.asarray(max_new_tokens, jnp.int32),
                                 bucket(max(max_new_tokens)))

    def decode(self, state: DecodeState, sampling: dict, max_rounds: int) -> DecodeState:
        """Up to max_rounds rounds of the jitted loop (sharded when on a mesh)."""
        with self._context():
            return self._decode(self.all_params(), state, sampling, max_rounds)

    def generate(self, prompts: list[list[int]], max_new_tokens: int | list[int],
                 sampling: SamplingParams | list[SamplingParams] | None = None,
                 chunk: int | None = None, on_tokens: Callable[[list[list[int]]], None] | None = None
                 ) -> list[list[int]]:
        """Generate for a batch; with `chunk`, the loop returns every `chunk` rounds to stream."""
        n = len(prompts)
        max_new = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
        sampling = sampling or SamplingParams()
        params = [sampling] * n if isinstance(sampling, SamplingParams) else list(sampling)
        state = self.start(prompts, max_new, params)
        stacked = stack_params(params)
        rounds = chunk or bucket(max(max_new))  # a static loop bound: bucketed, so few compiles; rows stop at their max
        shown = [0] * n
        while True:
            if on_tokens is not None:
                shown = _stream(state, shown, on_tokens)
            if bool(jnp.all(state.done_B)):
                break
            state = self.decode(state, stacked, rounds)
        return finished_tokens(state)


def finished_tokens(state: DecodeState) -> list[list[int]]:
    out, count = np.asarray(state.out_BN), np.asarray(state.count_B)
    return [out[b, :count[b]].tolist() for b in range(out.shape[0])]


def _stream(state: DecodeState, shown: list[int], on_tokens) -> list[int]:
    tokens = finished_tokens(state)
    on_tokens([t[s:] for t, s in zip(tokens, shown)])
    return [len(t) for t in tokens]
