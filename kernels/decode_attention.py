"""decode_attention and paged_attention: public entry points (impl switch, checks, XLA path).

q [B, N, H] (one new token per sequence), caches [B, S, K, H] (or pages [P, L, K, H]
with a page table [B, M]), lengths [B] = valid cache entries per sequence (the new
token's own K/V already written). int8 caches pass k_scale/v_scale [B, S, K] (or
[P, L, K]): per-token, per-head scales, dequantized inside the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import compat, decode_attention_gpu as dgpu, decode_attention_tpu as dtpu, paged_attention_cpu
from ._dispatch import choose, is_pow2
from .reference import decode_attention_reference, paged_attention_reference

TPU_BLOCK = 512
GPU_BLOCK = 64


def _common_checks(q, k, v, ks, vs) -> None:
    if q.ndim != 3 or k.ndim != 4 or v.shape != k.shape:
        raise compat.KernelShapeError(f"decode attention wants q [B,N,H], caches [.,.,K,H]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape[2] != k.shape[3] or q.shape[1] % k.shape[2]:
        raise compat.KernelShapeError(f"q {q.shape} vs cache {k.shape}: H must match and N % K == 0")
    if (ks is None) != (vs is None) or (ks is not None and k.dtype != jnp.int8):
        raise compat.KernelShapeError("int8 caches need both k_scale and v_scale (and int8 k, v)")
    if ks is not None and ks.shape != k.shape[:3]:
        raise compat.KernelShapeError(f"k_scale must be {k.shape[:3]} (per token, per kv head); got {ks.shape}")


def _dtype_reason(q, plat: str) -> str | None:
    ok = (jnp.bfloat16, jnp.float32) if plat == "tpu" else (jnp.bfloat16, jnp.float16, jnp.float32)
    return None if q.dtype in [jnp.dtype(d) for d in ok] else f"query dtype {q.dtype} unsupported"


def _pick_block(S: int, want: int, plat: str) -> int | None:
    """Largest block <= want dividing S (multiple of 128 on TPU, power of two on GPU)."""
    b = want
    while b >= (128 if plat == "tpu" else 16):
        if S % b == 0:
            return b
        b //= 2
    return S if plat == "tpu" and S % 8 == 0 and S <= want else None


def decode_attention(q_BNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array, lengths_B: jax.Array, *,
                     k_scale_BSK: jax.Array | None = None, v_scale_BSK: jax.Array | None = None,
                     sm_scale: float | None = None, soft_cap: float | None = None, impl: str = "auto",
                     block: int | None = None, interpret: bool | None = None,
                     platform: str | None = None) -> jax.Array:
    """Attention of one token per sequence over its first lengths[b] cache entries."""
    _common_checks(q_BNH, k_BSKH, v_BSKH, k_scale_BSK, v_scale_BSK)
    S, H = k_BSKH.shape[1], k_BSKH.shape[3]
    scale = float(H ** -0.5 if sm_scale is None else sm_scale)
    chosen: dict[str, int] = {}

    def check(plat: str) -> str | None:
        want = block or (TPU_BLOCK if plat == "tpu" else GPU_BLOCK)
        bs = _pick_block(S, want, plat)
        if bs is None:
            return f"cache length S={S} has no {'multiple-of-128' if plat == 'tpu' else 'power-of-two'} block <= {want}"
        if plat == "gpu" and not (is_pow2(H) and H >= 16):
            return f"head dim H={H} must be a power of two >= 16 (Triton tiles)"
        chosen["bs"] = bs
        return _dtype_reason(q_BNH, plat)

    which, plat = choose("decode_attention", impl, check, platform)
    if which != "pallas":  # the reference is plain XLA already: one einsum chain, masked
        return decode_attention_reference(q_BNH, k_BSKH, v_BSKH, lengths_B, sm_scale=scale, soft_cap=soft_cap,
                                          k_scale_BSK=k_scale_BSK, v_scale_BSK=v_scale_BSK).astype(q_BNH.dtype)
    cfg = dtpu.DCfg(sm_scale=scale, soft_cap=soft_cap, block=chosen["bs"], quantized=k_scale_BSK is not None,
                    interpret=compat.resolve_interpret(interpret))
    mod = dtpu if plat == "tpu" else dgpu
    return mod.decode(q_BNH, k_BSKH, v_BSKH, lengths_B, k_scale_BSK, v_scale_BSK, cfg)


def _paged_reason(L: int, H: int, dtype, plat: str) -> str | None:
    if plat == "tpu" and H % 128:
        return f"head dim H={H}: the TPU paged kernel reads (L, H) tiles in place and needs H % 128 == 0"
    if plat == "tpu" and L % 8:
        return f"page size L={L} must be a multiple of 8 (TPU sublanes)"
    if plat == "gpu" and not (is_pow2(L) and L >= 16 and is_pow2(H) and H >= 16):
        return f"page size L={L} and head dim H={H} must be powers of two >= 16 (Triton tiles)"
    return _dtype_reason(jax.ShapeDtypeStruct((), dtype), plat)


def _native_reason(page_dtype, head_dim: int, quantized: bool = False):
    """The native CPU kernel's check (paged_attention_cpu.py), built on first use."""
    return lambda: paged_attention_cpu.unavailable(page_dtype, head_dim, quantized)


def paged_attention_impl(page_size: int, head_dim: int, dtype, impl: str = "auto",
                         platform: str | None = None, page_dtype=None) -> str:
    """'pallas', 'cpu' (the native CPU kernel) or 'xla' (or 'reference'): what paged_attention
    runs for these pages (of page_dtype, default dtype) and queries here, so a caller can pick a
    layout before tracing (the serving engine: tpustack.infer.engine)."""
    return choose("paged_attention", impl, lambda plat: _paged_reason(page_size, head_dim, dtype, plat),
                  platform, native=_native_reason(page_dtype or dtype, head_dim))[0]


def paged_attention(q_BNH: jax.Array, k_pages_PLKH: jax.Array, v_pages_PLKH: jax.Array,
                    page_table_BM: jax.Array, lengths_B: jax.Array, *,
                    k_scale_PLK: jax.Array | None = None, v_scale_PLK: jax.Array | None = None,
                    sm_scale: float | None = None, soft_cap: float | None = None, impl: str = "auto",
                    interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """Decode attention where token s of sequence b lives in page page_table[b, s // L]."""
    _common_checks(q_BNH, k_pages_PLKH, v_pages_PLKH, k_scale_PLK, v_scale_PLK)
    L, H = k_pages_PLKH.shape[1], k_pages_PLKH.shape[3]
    scale = float(H ** -0.5 if sm_scale is None else sm_scale)
    which, plat = choose("paged_attention", impl, lambda plat: _paged_reason(L, H, q_BNH.dtype, plat), platform,
                         native=_native_reason(k_pages_PLKH.dtype, H, k_scale_PLK is not None))
    if which == "cpu":
        return paged_attention_cpu.paged_attention_cpu(q_BNH, k_pages_PLKH, v_pages_PLKH, page_table_BM, lengths_B,
                                                       sm_scale=scale, soft_cap=soft_cap).astype(q_BNH.dtype)
    if which != "pallas":
        return paged_attention_reference(q_BNH, k_pages_PLKH, v_pages_PLKH, page_table_BM, lengths_B,
                                         sm_scale=scale, soft_cap=soft_cap, k_scale_PLK=k_scale_PLK,
                                         v_scale_PLK=v_scale_PLK).astype(q_BNH.dtype)
    cfg = dtpu.DCfg(sm_scale=scale, soft_cap=soft_cap, block=L, quantized=k_scale_PLK is not None,
                    interpret=compat.resolve_interpret(interpret))
    mod = dtpu if plat == "tpu" else dgpu
    return mod.paged(q_BNH, k_pages_PLKH, v_pages_PLKH, page_table_BM, lengths_B, k_scale_PLK, v_scale_PLK, cfg)
