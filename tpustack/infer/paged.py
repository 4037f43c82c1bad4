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
