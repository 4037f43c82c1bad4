"""flash_attention: the public entry point (impl switch, custom_vjp, XLA fallback).

q [B, T, N, H], k/v [B, S, K, H] with N = K * G (grouped-query attention without
repeating K/V); optional segment ids [B, T] / [B, S] for packed sequences; causal
masks align bottom-right (query t sees keys <= t + S - T); optional logit soft-cap
cap * tanh(s / cap). Forward and backward keep O(T + S) memory per head: the backward
recomputes probabilities from the saved logsumexp instead of storing [T, S].
"""

from __future__ import annotations

import functools

import jax

from . import compat, flash_attention_gpu as fgpu, flash_attention_tpu as ftpu
from ._dispatch import choose
from .reference import attention_mask, attention_reference

TPU_BLOCKS = (128, 128)
GPU_BLOCKS = (64, 64)


def _validate(q, k, v, qs, ks) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise compat.KernelShapeError(
            f"flash_attention wants q [B,T,N,H] and k, v [B,S,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    B, T, N, H = q.shape
    if k.shape[0] != B or k.shape[3] != H or N % k.shape[2]:
        raise compat.KernelShapeError(
            f"q {q.shape} and k {k.shape}: batch and head dim must match and N % K == 0")
    if qs is not None and (qs.shape != (B, T) or ks.shape != (B, k.shape[1])):
        raise compat.KernelShapeError(
            f"segment ids must be [B,T]={B, T} and [B,S]={B, k.shape[1]}; got {qs.shape}, {ks.shape}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _pallas(q, k, v, qs, ks, cfg, plat):
    return _pallas_fwd(q, k, v, qs, ks, cfg, plat)[0]


def _pallas_fwd(q, k, v, qs, ks, cfg, plat):
    mod = ftpu if plat == "tpu" else fgpu
    o, lse = mod.forward(q, k, v, qs, ks, cfg)
    return o, (q, k, v, qs, ks, o, lse)


def _pallas_bwd(cfg, plat, res, do):
    q, k, v, qs, ks, o, lse = res
    mod = ftpu if plat == "tpu" else fgpu
    dq, dk, dv = mod.backward(q, k, v, qs, ks, o, lse, do, cfg)
    return dq, dk, dv, None, None


_pallas.defvjp(lambda q, k, v, qs, ks, cfg, plat: _pallas_fwd(q, k, v, qs, ks, cfg, plat), _pallas_bwd)


def _xla(q, k, v, qs, ks, causal, scale, soft_cap):
    """XLA path: jax.nn.dot_product_attention where it can express the call."""
    T, S = q.shape[1], k.shape[1]
    if soft_cap is None:
        mask = None
        if qs is not None or (causal and T != S):
            mask = attention_mask(T, S, causal, qs, ks)[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            is_causal=causal and mask is None)
    return attention_reference(q, k, v, qs, ks, causal=causal, sm_scale=scale, soft_cap=soft_cap)


def flash_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    segment_ids_BT: jax.Array | None = None,
    kv_segment_ids_BS: jax.Array | None = None,
    *,
    causal: bool = False,
    sm_scale: float | None = None,
    soft_cap: float | None = None,
    impl: str = "auto",
    block_q: int | None = None,
    block_k: int | None = None,
    interpret: bool | None = None,
    platform: str | None = None,
) -> jax.Array:
    """Attention over [B,T,N,H] queries and [B,S,K,H] keys/values; differentiable."""
    if segment_ids_BT is not None and kv_segment_ids_BS is None:
        kv_segment_ids_BS = segment_ids_BT
    _validate(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS)
    B, T, N, H = q_BTNH.shape
    S = k_BSKH.shape[1]
    scale = float(H ** -0.5 if sm_scale is None else sm_scale)
    if q_BTNH.dtype != k_BSKH.dtype or k_BSKH.dtype != v_BSKH.dtype:
        raise compat.KernelShapeError(f"q, k, v dtypes differ: {q_BTNH.dtype}, {k_BSKH.dtype}, {v_BSKH.dtype}")

    def check(plat: str) -> str | None:
        if plat == "tpu":
            bq, bk = block_q or TPU_BLOCKS[0], block_k or TPU_BLOCKS[1]
            return ftpu.check(T, S, H, q_BTNH.dtype, bq, bk)
        bq, bk = block_q or GPU_BLOCKS[0], block_k or GPU_BLOCKS[1]
        return fgpu.check(T, S, H, q_BTNH.dtype, bq, bk)

    which, plat = choose("flash_attention", impl, check, platform)
    if which == "reference":
        return attention_reference(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS,
                                   causal=causal, sm_scale=scale, soft_cap=soft_cap)
    if which == "xla":
        return _xla(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, causal, scale, soft_cap)
    dflt = TPU_BLOCKS if plat == "tpu" else GPU_BLOCKS
    cfg = ftpu.Cfg(causal=causal, sm_scale=scale, soft_cap=soft_cap, block_q=block_q or dflt[0],
                   block_k=block_k or dflt[1], interpret=compat.resolve_interpret(interpret),
                   has_seg=segment_ids_BT is not None)
    return _pallas(q_BTNH, k_BSKH, v_BSKH, segment_ids_BT, kv_segment_ids_BS, cfg, plat)
