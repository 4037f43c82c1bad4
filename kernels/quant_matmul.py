"""int8_matmul, int4_matmul, w8a8_matmul: public entry points (impl switch, checks, vjp).

x [..., K] @ W [K, N]: int8 W with per-output-channel scales [N]; int4 W packed two per
byte as [K/2, N] (reference.quantize_int4) with group-128 scales [K/128, N]; w8a8
quantizes x per token on the fly and accumulates in int32 (TPU kernel; XLA elsewhere).
int8/int4 are differentiable in x (dx = g @ W^T with W dequantized by XLA), so LoRA-style
training over frozen quantized weights works; weights and scales get no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from . import compat, quant_matmul_gpu as qgpu, quant_matmul_tpu as qtpu
from ._dispatch import choose, round_up
from .reference import (INT4_GROUP, dequantize_int4, int4_matmul_reference, int8_matmul_reference,
                        quantize_rows_int8, w8a8_matmul_reference)


def _block(n: int, options: tuple[int, ...]) -> int | None:
    return next((b for b in options if n % b == 0), None)


def _tiles(M: int, K: int, N: int, plat: str, kind: str) -> tuple[dict, str | None]:
    """Block sizes for this problem, or a reason the kernel cannot take it."""
    if plat == "tpu":
        bn = _block(N, (512, 256, 128))
        bk = _block(K // 2 if kind == "int4" else K, (512, 256, 128))
        bm = min(256, round_up(M, 32))  # 32 rows: the int8 sublane tile; a lone block is the full dim
        if bn is None or bk is None:
            return {}, f"N={N} and K={K} must be multiples of 128 (TPU lanes){' and K of 256 (int4)' if kind == 'int4' else ''}"
    else:
        bn = _block(N, (64, 32, 16) if M <= 16 else (128, 64, 32, 16))
        bk = _block(K, (128, 64, 32, 16))
        bm = min(64, max(16, 1 << (M - 1).bit_length()))  # Triton dot: >= 16 rows, power of two
        if bn is None or bk is None:
            return {}, f"N={N} and K={K} must be multiples of 16 (Triton tiles)"
    if kind == "int4" and K % (2 * INT4_GROUP):
        return {}, f"int4 needs K % {2 * INT4_GROUP} == 0, got K={K}"
    return dict(bm=bm, bn=bn, bk=bk), None


def _old_tpu() -> bool:
    """True on TPU generations before v5 (only knowable with real devices attached)."""
    if compat.backend() != "tpu":
        return False
    kind = jax.devices()[0].device_kind.lower()
    return any(f"v{g}" in kind for g in (2, 3, 4))


def _flat(x):
    return x.reshape(-1, x.shape[-1]), x.shape[:-1]


def _pad_rows(x, bm):
    M = x.shape[0]
    return jnp.pad(x, ((0, round_up(M, bm) - M), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _pallas(x, w, scale, kind, plat, tiles, interpret):
    t = dict(tiles)
    M = x.shape[0]
    xp = _pad_rows(x, t["bm"])
    if plat == "tpu":
        fn = qtpu.int8 if kind == "int8" else qtpu.int4
        y = fn(xp, w, scale, t["bm"], t["bn"], t["bk"], interpret)
    elif kind == "int8":
        y = qgpu.int8(xp, w, scale, t["bm"], t["bn"], t["bk"], interpret)
    else:
        y = qgpu.int4(xp, w, scale, t["bm"], t["bn"], interpret)
    return y[:M]


def _fwd(x, w, scale, kind, plat, tiles, interpret):
    return _pallas(x, w, scale, kind, plat, tiles, interpret), (w, scale)


def _bwd(kind, plat, tiles, interpret, res, g):
    w, scale = res
    wd = w.astype(jnp.float32) * scale[None, :] if kind == "int8" else dequantize_int4(w, scale)
    dx = jnp.dot(g.astype(jnp.float32), wd.T).astype(g.dtype)
    return dx, None, None


_pallas.defvjp(_fwd, _bwd)


def _matmul(kind: str, x, w, scale, impl, interpret, platform):
    if x.dtype not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32), jnp.dtype(jnp.float16)):
        raise compat.KernelShapeError(f"{kind}_matmul: x dtype {x.dtype} must be floating")
    x2, lead = _flat(x)
    M, K = x2.shape
    rows = K // 2 if kind == "int4" else K
    if w.dtype != jnp.int8 or w.ndim != 2 or w.shape[0] != rows:
        raise compat.KernelShapeError(f"{kind}_matmul: weights must be int8 [{rows}, N] for x [..., {K}]; got {w.dtype} {w.shape}")
    N = w.shape[1]
    want = (N,) if kind != "int4" else (K // INT4_GROUP, N)
    if scale.shape != want:
        raise compat.KernelShapeError(f"{kind}_matmul: scale must be {want}; got {scale.shape}")
    tiles: dict = {}

    def check(plat: str) -> str | None:
        t, why = _tiles(M, K, N, plat, kind)
        tiles.update(t)
        if why is None and plat == "gpu" and kind == "w8a8":
            why = "w8a8 has a TPU kernel only"
        if why is None and plat == "tpu" and kind == "w8a8" and _old_tpu():
            why = "int8 x int8 matmuls need TPU v5 or newer (Mosaic rejects an int8 RHS on v4)"
        if why is None and plat == "tpu" and x.dtype == jnp.float16:
            why = "float16 activations unsupported on TPU"
        return why

    which, plat = choose(f"{kind}_matmul", impl, check, platform)
    ref = {"int8": int8_matmul_reference, "int4": int4_matmul_reference, "w8a8": w8a8_matmul_reference}[kind]
    if which == "reference":
        y = ref(x2, w, scale)
    elif which == "xla":
        y = _xla(kind, x2, w, scale)
    elif kind == "w8a8":
        xq, xs = quantize_rows_int8(x2)
        bm = tiles["bm"]
        y = qtpu.w8a8(_pad_rows(xq, bm), _pad_rows(xs, bm), w, scale, x.dtype, bm, tiles["bn"], tiles["bk"],
                      compat.resolve_interpret(interpret))[:M]
    else:
        y = _pallas(x2, w, scale, kind, plat, tuple(sorted(tiles.items())), compat.resolve_interpret(interpret))
    return y.reshape(*lead, N)


def _xla(kind, x, w, scale):
    """What XLA makes of it: convert fused into the dot where the backend can."""
    if kind == "int8":
        return (jnp.dot(x, w.astype(x.dtype), preferred_element_type=jnp.float32) * scale).astype(x.dtype)
    if kind == "int4":
        wd = dequantize_int4(w, scale).astype(x.dtype)
        return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)
    xq, xs = quantize_rows_int8(x)
    acc = jnp.dot(xq, w, preferred_element_type=jnp.int32)
    return (acc.astype(jnp.float32) * xs * scale[None, :]).astype(x.dtype)


def int8_matmul(x: jax.Array, w_KN: jax.Array, scale_N: jax.Array, *, impl: str = "auto",
                interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """x [..., K] @ (int8 w [K, N] * scale [N]); differentiable in x."""
    return _matmul("int8", x, w_KN, scale_N, impl, interpret, platform)


def int4_matmul(x: jax.Array, packed_KN: jax.Array, scale_GN: jax.Array, *, impl: str = "auto",
                interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """x [..., K] @ int4 weights packed [K/2, N] with group-128 scales [K/128, N]; differentiable in x."""
    return _matmul("int4", x, packed_KN, scale_GN, impl, interpret, platform)


def w8a8_matmul(x: jax.Array, w_KN: jax.Array, scale_N: jax.Array, *, impl: str = "auto",
                interpret: bool | None = None, platform: str | None = None) -> jax.Array:
    """Per-token int8 x [..., K] times int8 w [K, N] with int32 accumulation (inference only)."""
    return _matmul("w8a8", x, w_KN, scale_N, impl, interpret, platform)
