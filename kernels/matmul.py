"""Float matmul x [M, K] @ w [K, N] with a native CPU kernel where XLA CPU is weak.

XLA CPU hands dots of 2..8 rows to YNNPACK, whose GEMM over weights streamed from memory
cost 1.3x (M = 2) to ~2x (M = 4..8) a one-row step on a 23M model: a speculative verify of
k + 1 tokens then costs ~2 decoding steps, which is most of what speculation saves.
matmul_cpu.cc streams w once for all rows instead (a 5-row pass of the 23M target: 4.2 ms
against 5.4 ms on XLA). More than 8 rows stay on XLA (compute-bound: XLA's GEMM is good
there). Inference needs only the forward; gradients, if asked for, are XLA's dots.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from . import compat, matmul_cpu

MATMUL_IMPLS = ("auto", "cpu", "xla")
# One row too: with the work on as many threads as cores, a 23M model's plain decoding step is
# 0.60-0.79x XLA's gemv's in the decode loop (bench decode TPOT, same run). More than 8 rows
# are compute-bound, where XLA's GEMM does as well (the LM head [64, 768] x [768, 32000]: 25 ms both).
NATIVE_ROWS = (1, matmul_cpu.STREAM_ROWS)  # the rows `auto` gives the native kernel on CPU


def matmul_impl(m: int, w_dtype=jnp.float32, impl: str = "auto") -> str:
    """'cpu' or 'xla': what matmul(impl=impl) runs for an [m, K] @ [K, N] of w_dtype weights here."""
    if impl not in MATMUL_IMPLS:
        raise compat.KernelShapeError(f"matmul: impl={impl!r}; use one of {MATMUL_IMPLS}")
    if impl == "xla":
        return "xla"
    if impl == "cpu":
        why = "the native kernel runs on a CPU backend only" if compat.backend() != "cpu" else \
            matmul_cpu.unavailable(w_dtype)
        if why:
            raise compat.KernelShapeError(f"matmul (cpu): {why}")
        return "cpu"
    lo, hi = NATIVE_ROWS
    take = compat.backend() == "cpu" and lo <= m <= hi and matmul_cpu.unavailable(w_dtype) is None
    return "cpu" if take else "xla"


@jax.custom_vjp
def _native(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    return matmul_cpu.matmul_cpu(x_MK, w_KN).astype(x_MK.dtype)


def _native_fwd(x_MK, w_KN):
    return _native(x_MK, w_KN), (x_MK, w_KN)


def _native_bwd(res, g_MN):
    x_MK, w_KN = res
    return (g_MN @ w_KN.T).astype(x_MK.dtype), (x_MK.T @ g_MN).astype(w_KN.dtype)


_native.defvjp(_native_fwd, _native_bwd)


def packable(w_dtype=jnp.float32) -> str | None:
    """None when `pack_weight` / `packed_matmul` run here (a CPU backend, the native kernel
    built, f32 or bf16 weights), else why not."""
    if compat.backend() != "cpu":
        return "the packed matmul runs on a CPU backend only"
    return matmul_cpu.unavailable(w_dtype)


def pack_weight(w_KN: jax.Array) -> jax.Array:
    """w [K, N] packed once for `packed_matmul`: [ceil(N / 48), K, 48], column panels (zero-padded).
    An inference engine packs its dense weights at load: every block the kernel reads is then
    contiguous (no per-call copy of w), and a row's result does not depend on how many rows
    share the call."""
    return matmul_cpu.pack(w_KN)


def packed_matmul(x_MK: jax.Array, w_PKC: jax.Array, n: int) -> jax.Array:
    """x [M, K] @ w (`pack_weight` of a [K, n]) in x's dtype (f32 accumulation); forward only."""
    why = packable(w_PKC.dtype)
    if why:
        raise compat.KernelShapeError(f"packed_matmul: {why}")
    return matmul_cpu.matmul_packed_cpu(x_MK, w_PKC, n).astype(x_MK.dtype)


def matmul(x_MK: jax.Array, w_KN: jax.Array, impl: str = "auto") -> jax.Array:
    """x [M, K] @ w [K, N] in x's dtype (f32 accumulation); impl auto | cpu | xla (see matmul_impl)."""
    if matmul_impl(x_MK.shape[0], w_KN.dtype, impl) == "cpu":
        return _native(x_MK, w_KN)
    return x_MK @ w_KN
