"""Plain-jnp references (the oracles in tests) for every kernel in this package.

Letters: B batch, T query length, S key length, N query heads, K kv heads, G = N // K
groups, H head dim, P pages, L page size. Attention math in f32 whatever the input
dtype; rows with no visible key give zeros (the kernels do the same).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from .compat import MASK_VALUE


def attention_mask(T: int, S: int, causal: bool, q_seg=None, kv_seg=None, kv_len=None):
    """Boolean mask [B or 1, T, S]: causal aligned bottom-right (query t sees keys <= t + S - T)."""
    mask = jnp.ones((1, T, S), bool)
    if causal:
        mask &= (jnp.arange(S)[None, :] <= jnp.arange(T)[:, None] + (S - T))[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
    if kv_len is not None:  # [B] valid keys per sequence
        mask = mask & (jnp.arange(S)[None, None, :] < kv_len[:, None, None])
    return mask


def _softmax_rows(s, mask):
    s = jnp.where(mask, s, MASK_VALUE)
    p = jnp.exp(s - s.max(-1, keepdims=True))
    p = jnp.where(mask, p, 0.0)
    l = p.sum(-1, keepdims=True)
    return p / jnp.where(l > 0, l, 1.0)


def attention_reference(q_BTNH, k_BSKH, v_BSKH, q_seg_BT=None, kv_seg_BS=None, *,
                        causal: bool = False, sm_scale: float | None = None,
                        soft_cap: float | None = None, kv_len_B=None) -> jax.Array:
    """softmax(cap(q k^T * scale) + mask) v with grouped-query heads, in f32."""
    B, T, N, H = q_BTNH.shape
    S, K = k_BSKH.shape[1], k_BSKH.shape[2]
    G = N // K
    scale = H ** -0.5 if sm_scale is None else sm_scale
    q = q_BTNH.astype(jnp.float32).reshape(B, T, K, G, H)
    s_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q, k_BSKH.astype(jnp.float32)) * scale
    if soft_cap:
        s_BKGTS = soft_cap * jnp.tanh(s_BKGTS / soft_cap)
    mask = attention_mask(T, S, causal, q_seg_BT, kv_seg_BS, kv_len_B)[:, None, None]
    p = _softmax_rows(s_BKGTS, mask)
    o = jnp.einsum("bkgts,bskh->btkgh", p, v_BSKH.astype(jnp.float32))
    return o.reshape(B, T, N, H).astype(q_BTNH.dtype)


def dequantize_kv(x_BSKH, scale_BSK):
    """int8 KV cache entries times their per-token, per-head scales."""
    return x_BSKH.astype(jnp.float32) * scale_BSK[..., None].astype(jnp.float32)


def decode_attention_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, *, sm_scale=None,
                               soft_cap=None, k_scale_BSK=None, v_scale_BSK=None) -> jax.Array:
    """One query token per sequence over the first lengths[b] cache entries."""
    if k_scale_BSK is not None:
        k_BSKH, v_BSKH = dequantize_kv(k_BSKH, k_scale_BSK), dequantize_kv(v_BSKH, v_scale_BSK)
    o = attention_reference(q_BNH[:, None], k_BSKH, v_BSKH, sm_scale=sm_scale,
                            soft_cap=soft_cap, kv_len_B=lengths_B)
    return o[:, 0]


def gather_pages(pages_PLKH, page_table_BM):
    """[P, L, K, H] pages and a [B, M] table -> contiguous [B, M*L, K, H] caches."""
    g = pages_PLKH[page_table_BM]  # [B, M, L, K, H]
    B, M, L = g.shape[:3]
    return g.reshape(B, M * L, *g.shape[3:])


def paged_attention_reference(q_BNH, k_pages_PLKH, v_pages_PLKH, page_table_BM, lengths_B, *,
                              sm_scale=None, soft_cap=None, k_scale_PLK=None,
                              v_scale_PLK=None) -> jax.Array:
    """Decode attention where sequence b's token s lives in page table[b, s // L], slot s % L."""
    k, v = gather_pages(k_pages_PLKH, page_table_BM), gather_pages(v_pages_PLKH, page_table_BM)
    ks = vs = None
    if k_scale_PLK is not None:
        ks = gather_pages(k_scale_PLK, page_table_BM)
        vs = gather_pages(v_scale_PLK, page_table_BM)
    return decode_attention_reference(q_BNH, k, v, lengths_B, sm_scale=sm_scale,
                                      soft_cap=soft_cap, k_scale_BSK=ks, v_scale_BSK=vs)


# ---- quantized matmul ------------------------------------------------------------------

INT4_GROUP = 128


def quantize_int8(w_KN):
    """Symmetric per-output-channel int8: returns (q [K, N] int8, scale [N] f32)."""
    w = w_KN.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def quantize_int4(w_KN, group: int = INT4_GROUP):
    """Symmetric group-wise int4, packed two per byte.

    Returns (packed [K/2, N] int8, scale [K/group, N] f32). Row i of `packed` holds
    w[i] in its low nibble and w[i + K/2] in its high nibble, so a kernel reads the two
    halves of x against one weight tile without interleaving lanes or sublanes.
    """
    K, N = w_KN.shape
    if K % (2 * group):
        raise ValueError(f"int4 needs K % {2 * group} == 0, got K={K}")
    w = w_KN.astype(jnp.float32).reshape(K // group, group, N)
    scale = jnp.max(jnp.abs(w), axis=1) / 7.0
    scale = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w / scale[:, None]), -7, 7).astype(jnp.int32).reshape(K, N)
    lo, hi = q[: K // 2], q[K // 2:]
    packed = (hi << 4) | (lo & 0xF)
    return packed.astype(jnp.uint8).astype(jnp.int8), scale  # wrap to int8 bit pattern


def unpack_int4(packed_KN):
    """Inverse of the packing in quantize_int4: int8 [K/2, N] -> int32 [K, N] in [-8, 7]."""
    p = packed_KN.astype(jnp.int32)
    lo = (p << 28) >> 28
    hi = p >> 4
    return jnp.concatenate([lo, hi], axis=0)


def dequantize_int4(packed_KN, scale_GN, group: int = INT4_GROUP):
    """Expanded f32 weights of an int4-packed matrix."""
    q = unpack_int4(packed_KN).astype(jnp.float32)
    return q * jnp.repeat(scale_GN, group, axis=0)


def int8_matmul_reference(x_MK, w_KN, scale_N):
    """x @ (w * scale) in f32, cast to x's dtype."""
    y = x_MK.astype(jnp.float32) @ (w_KN.astype(jnp.float32) * scale_N[None, :])
    return y.astype(x_MK.dtype)


def int4_matmul_reference(x_MK, packed_KN, scale_GN):
    """x @ dequantize_int4(packed, scale) in f32, cast to x's dtype."""
    y = x_MK.astype(jnp.float32) @ dequantize_int4(packed_KN, scale_GN)
    return y.astype(x_MK.dtype)


def quantize_rows_int8(x_MK):
    """Dynamic per-token (row) int8 activations: (q [M, K] int8, scale [M, 1] f32)."""
    x = x_MK.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=1, keepdims=True) / 127.0
    s = jnp.where(s > 0, s, 1.0)
    return jnp.clip(jnp.round(x / s), -127, 127).astype(jnp.int8), s


def w8a8_matmul_reference(x_MK, w_KN, scale_N):
    """Per-token int8 activations x per-channel int8 weights, int32 accumulation."""
    xq, xs = quantize_rows_int8(x_MK)
    acc = jnp.dot(xq.astype(jnp.int32), w_KN.astype(jnp.int32))
    return (acc.astype(jnp.float32) * xs * scale_N[None, :]).astype(x_MK.dtype)
