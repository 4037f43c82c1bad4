"""The model step over a paged KV cache: one ragged batch of tokens from many sequences.

Letters as in tpustack.model.layers, plus T the step's tokens (flattened over sequences),
S the step's sequences, P pages, L page size, M pages per sequence (its block table).

A step's tokens are any mix of prompt chunks and single decode tokens: token t belongs
to sequence seq_T[t] at position positions_T[t]. The model sees them as one row [1, T];
each layer writes their keys/values to page table[seq, pos // L], slot pos % L, then each
token attends, as its own query row, over its sequence's first pos + 1 slots through
tpustack.kernels.paged_attention (Pallas on TPU/GPU, XLA on CPU). Writing before reading
is what makes a prompt chunk see itself causally and the earlier chunks of its prompt.
Padding tokens use an all-null table row: they write to page 0 and read only it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from tpustack.config import ModelConfig
from tpustack.infer.sampling import sample_tokens
from tpustack.infer.speculative import accept, propose
from tpustack.kernels import paged_attention
from tpustack.model.transformer import Decoder

PAGED_DTYPES = ("float32", "bfloat16", "float16")


@struct.dataclass
class PagedLayerCache:
    """One layer's pages [P, L, K, H], plus each step token's block table [T, M]."""

    k_PLKH: jax.Array
    v_PLKH: jax.Array
    table_TM: jax.Array
    impl: str = struct.field(pytree_node=False, default="auto")
    interpret: bool | None = struct.field(pytree_node=False, default=None)  # None: on CPU only

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> "PagedLayerCache":
        """Scatter the step's keys/values (B == 1) into their pages."""
        size = self.k_PLKH.shape[1]
        pos_T = positions_BT[0]
        page_T = jnp.take_along_axis(self.table_TM, (pos_T // size)[:, None], axis=1)[:, 0]
        slot_T = pos_T % size
        dtype = self.k_PLKH.dtype
        return self.replace(k_PLKH=self.k_PLKH.at[page_T, slot_T].set(k_BTKH[0].astype(dtype)),
                            v_PLKH=self.v_PLKH.at[page_T, slot_T].set(v_BTKH[0].astype(dtype)))

    def attend(self, q_BTNH: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Each token over its own sequence's keys up to and including its position."""
        out_TNH = paged_attention(q_BTNH[0], self.k_PLKH, self.v_PLKH, self.table_TM, positions_BT[0] + 1,
                                  impl=self.impl, interpret=self.interpret)
        return out_TNH[None].astype(q_BTNH.dtype)


def init_pages(cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32") -> tuple:
    """Zeroed (k, v) pages for every layer."""
    if dtype not in PAGED_DTYPES:
        raise ValueError(f"paged cache dtype {dtype!r} is not one of {PAGED_DTYPES}")
    shape = (num_pages, page_size, cfg.num_kv_heads, cfg.heads_dim)
    return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers))


def pages_bytes(cfg: ModelConfig, num_pages: int, page_size: int, dtype: str = "float32") -> int:
    """Bytes of the pool: 2 (K and V) * layers * pages * L * K * H * itemsize."""
    return 2 * cfg.num_layers * num_pages * page_size * cfg.num_kv_heads * cfg.heads_dim * jnp.dtype(dtype).itemsize


def paged_step(model: Decoder, params: Any, pages: tuple, tokens_T: jax.Array, positions_T: jax.Array,
               seq_T: jax.Array, tables_SM: jax.Array, last_S: jax.Array, sampling: dict[str, jax.Array],
               impl: str = "auto", interpret: bool | None = None, top_logprobs: int = 0
               ) -> tuple[dict[str, jax.Array], tuple]:
    """Run the step's tokens, sample one token per sequence at its last token.

    Returns ({"next": [S], "logprob": [S], and with top_logprobs > 0 "top_ids",
    "top_logprobs": [S, top_logprobs]}, new pages). Log-probabilities are the model's
    (log_softmax of the raw logits, before temperature and filtering), as OpenAI reports.
    `sampling` holds per-sequence temperature, top_k, top_p and seed [S]; the key of a
    sequence's token at position p is fold_in(key(seed), p), as in the decode loop, so a
    request samples the same tokens whatever shares its steps.
    """
    table_TM = tables_SM[seq_T]
    caches = tuple(PagedLayerCache(k, v, table_TM, impl, interpret) for k, v in pages)
    logits_BSV, caches = model.apply({"params": params}, tokens_T[None], positions_T[None], cache=caches,
                                     select_BS=last_S[None])
    params_S = {"temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"],
                "key": jax.vmap(jax.random.key)(sampling["seed"])}
    next_S = sample_tokens(logits_BSV[0], params_S, positions_T[last_S] + 1)
    logp_SV = jax.nn.log_softmax(logits_BSV[0].astype(jnp.float32), axis=-1)
    out = {"next": next_S, "logprob": jnp.take_along_axis(logp_SV, next_S[:, None], axis=1)[:, 0]}
    if top_logprobs:
        out["top_logprobs"], out["top_ids"] = jax.lax.top_k(logp_SV, top_logprobs)
    return out, tuple((c.k_PLKH, c.v_PLKH) for c in caches)


def speculative_paged_step(target: Decoder, draft: Decoder, params: tuple, pages: tuple, tokens_T: jax.Array,
                           positions_T: jax.Array, seq_T: jax.Array, tables_SM: jax.Array, last_S: jax.Array,
                           spec_S: jax.Array, sampling: dict[str, jax.Array], k: int, impl: str = "auto",
                           interpret: bool | None = None) -> tuple[dict[str, jax.Array], tuple]:
    """`paged_step` where sequences with spec_S decode speculatively (chapter 30.4f).

    A speculating sequence holds k + 1 contiguous step slots from last_S: its pending token,
    then k placeholders for the draft's proposals. The draft runs the whole step once (so
    prompt chunks fill its pages too; the pending token's logits give d_1), then k single
    tokens per sequence (d_i at pos + i, so its pages cover every proposal); the target
    then scores every slot in one pass and the acceptance rule of
    tpustack.infer.speculative picks the committed tokens, with the same key streams, so a
    request commits what SpeculativeGenerator would. Other sequences sample one token as in
    `paged_step`. Both models share the block tables; pages = (target pages, draft pages).
    Returns ({"tokens": [S, k + 1], "count": [S], "accepted": [S]}, pages).
    """
    target_params, draft_params = params
    target_pages, draft_pages = pages
    t, s, r = tokens_T.shape[0], last_S.shape[0], k + 1
    table_TM = tables_SM[seq_T]
    keyed = {"temperature": sampling["temperature"], "top_k": sampling["top_k"], "top_p": sampling["top_p"],
             "key": jax.vmap(jax.random.key)(sampling["seed"])}
    pos_S = positions_T[last_S]  # a speculating sequence's pending position

    caches = tuple(PagedLayerCache(kp, vp, table_TM, impl, interpret) for kp, vp in draft_pages)
    logits_BSV, caches = draft.apply({"params": draft_params}, tokens_T[None], positions_T[None], cache=caches,
                                     select_BS=last_S[None])
    spec_tables_SM = jnp.where(spec_S[:, None], tables_SM[:s], 0)  # others write their serial steps to page 0
    caches = tuple(c.replace(table_TM=spec_tables_SM) for c in caches)

    def draft_step(carry, i):
        logits_SV, caches = carry
        proposal_S, q_SV = propose(logits_SV, keyed, pos_S + i)
        logits_BSV, caches = draft.apply({"params": draft_params}, proposal_S[None], (pos_S + i)[None], cache=caches)
        return (logits_BSV[0], caches), (proposal_S, q_SV)

    (_, caches), (drafts_KS, q_KSV) = jax.lax.scan(draft_step, (logits_BSV[0], caches), jnp.arange(1, k + 1))
    draft_pages = tuple((c.k_PLKH, c.v_PLKH) for c in caches)
    drafts_SK, q_SKV = drafts_KS.T, jnp.swapaxes(q_KSV, 0, 1)

    slots_SR = jnp.minimum(last_S[:, None] + jnp.arange(r)[None, :], t - 1)
    fill_SK = jnp.where(spec_S[:, None], slots_SR[:, 1:], t)  # t: dropped
    tokens_T = tokens_T.at[fill_SK].set(drafts_SK, mode="drop")
    caches = tuple(PagedLayerCache(kp, vp, table_TM, impl, interpret) for kp, vp in target_pages)
    logits_BXV, caches = target.apply({"params": target_params}, tokens_T[None], positions_T[None], cache=caches,
                                      select_BS=slots_SR.reshape(1, s * r))
    logits_SRV = logits_BXV[0].reshape(s, r, -1)
    target_pages = tuple((c.k_PLKH, c.v_PLKH) for c in caches)

    new_SR, n_S = accept(logits_SRV, q_SKV, drafts_SK, keyed, pos_S)

    plain_S = sample_tokens(logits_SRV[:, 0], keyed, pos_S + 1)  # sequences not speculating
    tokens_SR = jnp.where(spec_S[:, None], new_SR, jnp.zeros_like(new_SR).at[:, 0].set(plain_S))
    out = {"tokens": tokens_SR, "count": jnp.where(spec_S, n_S + 1, 1), "accepted": jnp.where(spec_S, n_S, 0)}
    return out, (target_pages, draft_pages)
