"""Speculative decoding: a draft proposes k tokens, the target checks all k + 1 in one pass.

One round, per row (chapter 30.4f): the draft feeds the pending token and its own
proposals (k cheap serial calls; the first also re-feeds the previous token, so its cache
covers the last round's d_k when all were accepted), giving d_1..d_k with draft distributions q_i. The target scores [pending, d_1..d_k] at once,
giving p_1..p_{k+1}. d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the
first rejection the row takes a sample from normalise(max(0, p_i - q_i)) instead, and if
all k are accepted it takes a bonus sample from p_{k+1}. This makes the committed tokens
follow the target's distribution exactly. Greedy rows use one-hot p and q, which turns
the same rule into "accept while the draft equals the target's argmax".

Rolling back is free: rejected drafts sit in cache slots at or after the row's new
position, which are masked and later overwritten (see decode.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer.cache import init_cache
from tpustack.infer.decode import DecodeState, Generator
from tpustack.infer.sampling import filtered_logits
from tpustack.model.transformer import Decoder, unstack_layers
from tpustack.plan.cost import tokens_per_round

_DRAFT, _ACCEPT, _RESAMPLE = 1, 2, 3  # key streams, so no two draws share randomness


def target_probs(logits_BV: jax.Array, sampling: dict[str, jax.Array]) -> jax.Array:
    """The distribution a row samples from: filtered softmax, or one-hot argmax when greedy."""
    greedy_BV = jax.nn.one_hot(jnp.argmax(logits_BV, axis=-1), logits_BV.shape[-1], dtype=jnp.float32)
    probs_BV = jax.nn.softmax(filtered_logits(logits_BV.astype(jnp.float32), sampling), axis=-1)
    return jnp.where((sampling["temperature"] > 0)[:, None], probs_BV, greedy_BV)


def _keys(sampling: dict, positions_B: jax.Array, stream: int) -> jax.Array:
    keys_B = jax.vmap(jax.random.fold_in)(sampling["key"], positions_B)
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys_B)


def _draw(keys_B: jax.Array, probs_BV: jax.Array) -> jax.Array:
    return jax.vmap(jax.random.categorical)(keys_B, jnp.log(probs_BV)).astype(jnp.int32)


def residual(p_BV: jax.Array, q_BV: jax.Array) -> jax.Array:
    """normalise(max(0, p - q)): what a rejected position resamples from (q = 0 past the drafts,
    so the bonus position samples p itself)."""
    r_BV = jnp.maximum(p_BV - q_BV, 0.0)
    r_BV = jnp.where(jnp.sum(r_BV, -1, keepdims=True) > 0, r_BV, p_BV)  # p == q: any draw is exact
    return r_BV / jnp.sum(r_BV, axis=-1, keepdims=True)


def propose(logits_BV: jax.Array, sampling: dict, positions_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The draft's proposal for the token at positions_B, and the distribution q it came from."""
    q_BV = target_probs(logits_BV, sampling)
    return _draw(_keys(sampling, positions_B, _DRAFT), q_BV), q_BV


def accept(logits_BRV: jax.Array, q_BKV: jax.Array, drafts_BK: jax.Array, sampling: dict,
           pos_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The acceptance rule: target logits at [pending, d_1..d_k] (pending at pos_B) and the
    draft's q -> (committed tokens [B, k+1], accepted drafts n [B]); the first n + 1 count."""
    b, r, v = logits_BRV.shape
    k = r - 1
    flat = {name: jnp.repeat(sampling[name], r) for name in ("temperature", "top_k", "top_p")}
    p_BRV = target_probs(logits_BRV.reshape(b * r, v), flat).reshape(b, r, v)

    p_draft_BK = jnp.take_along_axis(p_BRV[:, :k], drafts_BK[..., None], axis=-1)[..., 0]
    q_draft_BK = jnp.take_along_axis(q_BKV, drafts_BK[..., None], axis=-1)[..., 0]
    u_BK = jax.vmap(lambda key: jax.random.uniform(key, (k,)))(_keys(sampling, pos_B, _ACCEPT))
    accept_BK = u_BK * q_draft_BK < p_draft_BK  # u < p/q without dividing by a zero q
    n_B = jnp.sum(jnp.cumprod(accept_BK, axis=1), axis=1)  # accepted prefix length

    # At the first rejection: sample the residual max(0, p - q); with all accepted: p_{k+1}.
    q_pad_BRV = jnp.concatenate([q_BKV, jnp.zeros((b, 1, v), q_BKV.dtype)], axis=1)
    p_n_BV = jnp.take_along_axis(p_BRV, n_B[:, None, None], axis=1)[:, 0]
    q_n_BV = jnp.take_along_axis(q_pad_BRV, n_B[:, None, None], axis=1)[:, 0]
    fix_B = _draw(_keys(sampling, pos_B, _RESAMPLE), residual(p_n_BV, q_n_BV))

    new_BR = jnp.concatenate([drafts_BK, jnp.zeros((b, 1), jnp.int32)], axis=1)
    return jnp.where(jnp.arange(r)[None, :] == n_B[:, None], fix_B[:, None], new_BR), n_B


def greedy_accept(logits_BRV: jax.Array, drafts_BK: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`accept` when every row is greedy: the target's argmax at every slot, and the length
    of the prefix where the drafts equal it (what the general rule gives with one-hot p, q)."""
    best_BR = jnp.argmax(logits_BRV, axis=-1).astype(jnp.int32)
    n_B = jnp.sum(jnp.cumprod(drafts_BK == best_BR[:, :-1], axis=1), axis=1)
    return best_BR, n_B


def _draft_inputs(state: DecodeState) -> tuple[jax.Array, jax.Array]:
    """The draft's first call of a round: [previous, pending] at [pos - 1, pos], so the draft's
    cache also gets d_k when the last round accepted all k drafts, without a (k+1)-th draft
    step. Right after prefill (one committed token) the previous token is the prompt's, already
    cached: feed the pending token twice at pos (both slots write the same keys and values)."""
    has_prev_B = state.count_B >= 2
    prev_B = jnp.take_along_axis(state.out_BN, jnp.maximum(state.count_B - 2, 0)[:, None], axis=1)[:, 0]
    tokens_B2 = jnp.stack([jnp.where(has_prev_B, prev_B, state.pending_B), state.pending_B], axis=1)
    positions_B2 = jnp.stack([jnp.where(has_prev_B, state.pos_B - 1, state.pos_B), state.pos_B], axis=1)
    return tokens_B2, positions_B2


def speculative_round(target: Decoder, draft: Decoder, params: tuple, state: DecodeState, sampling: dict,
                      k: int) -> tuple[jax.Array, jax.Array, DecodeState]:
    """Propose k tokens with the draft, verify with the target: (tokens [B, k+1], counts [B], state).

    k draft calls (the first feeds two tokens, see _draft_inputs), unrolled, and one target call
    of k + 1 tokens. All-greedy batches skip the draft's distributions and every random draw
    (lax.cond on device: no host round trip)."""
    target_params, draft_params = params
    target_cache, draft_cache = state.caches
    pos_B = state.pos_B
    any_sampled = jnp.any(sampling["temperature"] > 0)
    b, v = pos_B.shape[0], target.cfg.vocab_size

    def proposal(logits_BV, positions_B):
        return jax.lax.cond(any_sampled, lambda x: propose(x, sampling, positions_B),
                            lambda x: (jnp.argmax(x, axis=-1).astype(jnp.int32), jnp.zeros((b, v), jnp.float32)),
                            logits_BV)

    tokens_BT, positions_BT = _draft_inputs(state)
    proposals, qs = [], []
    for i in range(k):  # unrolled: k is small, and each call's shapes are static
        logits_BTV, draft_cache = draft.apply({"params": draft_params}, tokens_BT, positions_BT, cache=draft_cache)
        proposal_B, q_BV = proposal(logits_BTV[:, -1].astype(jnp.float32), pos_B + i + 1)
        proposals.append(proposal_B)
        qs.append(q_BV)
        tokens_BT, positions_BT = proposal_B[:, None], (pos_B + i + 1)[:, None]
    drafts_BK = jnp.stack(proposals, axis=1)
    q_BKV = jnp.stack(qs, axis=1)

    tokens_BR = jnp.concatenate([state.pending_B[:, None], drafts_BK], axis=1)  # R = k + 1
    positions_BR = pos_B[:, None] + jnp.arange(k + 1)[None, :]
    logits_BRV, target_cache = target.apply({"params": target_params}, tokens_BR, positions_BR,
                                            cache=target_cache)
    new_BR, n_B = jax.lax.cond(any_sampled, lambda x: accept(x, q_BKV, drafts_BK, sampling, pos_B),
                               lambda x: greedy_accept(x, drafts_BK), logits_BRV)
    live_B = ~state.done_B
    state = state.replace(caches=(target_cache, draft_cache),
                          drafted_B=state.drafted_B + jnp.where(live_B, k, 0),
                          accepted_B=state.accepted_B + jnp.where(live_B, n_B, 0),
                          rejected_B=state.rejected_B + jnp.where(live_B & (n_B < k), 1, 0))
    return new_BR, n_B + 1, state


@dataclasses.dataclass
class SpeculativeGenerator(Generator):
    """A Generator whose rounds are speculative: same prefill, loop, stopping and streaming."""

    draft_cfg: ModelConfig | None = None
    draft_params: Any = None
    k: int = 4

    def __post_init__(self):
        if self.draft_cfg is None:
            raise UserError("--draft: speculative decoding needs a draft model")
        if self.draft_cfg.vocab_size != self.cfg.vocab_size:
            raise UserError(f"--draft: the draft's vocabulary has {self.draft_cfg.vocab_size} tokens, the "
                            f"target's {self.cfg.vocab_size}; they must share one tokenizer")
        if self.k < 1:
            raise UserError(f"--speculate-k {self.k}: must be >= 1")
        self.draft_cfg = dataclasses.replace(self.draft_cfg, scan_layers=False, remat_policy="none", **self._decode_kernels(),
                                             max_seq_len=max(self.draft_cfg.max_seq_len, self.cfg.max_seq_len))
        self.draft_params = self.place(unstack_layers(self.draft_params, self.draft_cfg), self.draft_cfg)
        self.draft = Decoder(self.draft_cfg)
        super().__post_init__()

    def models(self) -> tuple[Decoder, ...]:
        return (self.model, self.draft)

    def all_params(self) -> tuple:
        return (self.params, self.draft_params)

    def new_caches(self, batch: int, length: int) -> tuple:
        return self.place_cache((init_cache(self.cfg, batch, length, self.cache_dtype),
                                 init_cache(self.draft_cfg, batch, length, self.cache_dtype)))

    def extra_positions(self) -> int:
        return self.k + 1

    def round(self, params: tuple, state: DecodeState, sampling):
        return speculative_round(self.model, self.draft, params, state, sampling, self.k)


def acceptance_stats(state: DecodeState, k: int) -> dict[str, float]:
    """Draft acceptance (accepted / drafted), the per-token acceptance probability a (accepted
    / accept-or-reject decisions), tokens per round, and the chapter's prediction from a."""
    accepted, drafted, rejected = (float(jnp.sum(x)) for x in (state.accepted_B, state.drafted_B,
                                                               state.rejected_B))
    rounds = drafted / k
    alpha = accepted / max(accepted + rejected, 1.0)
    return {"acceptance_rate": accepted / max(drafted, 1.0), "alpha": alpha,
            "tokens_per_round": (accepted + rounds) / max(rounds, 1.0),
            "predicted_tokens_per_round": tokens_per_round(alpha, k)}
