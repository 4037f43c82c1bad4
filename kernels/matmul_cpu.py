"""Dense matmul on CPU: matmul_cpu.cc, an XLA FFI custom call (built on first use, kernels/_native.py).

XLA CPU hands the dots of 2..8 rows (decoding a few sequences, a speculative verify of k + 1
tokens) to YNNPACK, whose GEMM over weights streamed from memory cost 1.3-2x a one-row step.
The kernel streams w once for up to 8 rows of x (more rows: column chunks, w still read once),
splitting the work over XLA's own intra-op thread pool. kernels/matmul.py decides when to use it.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp

from . import _native

_SOURCE = Path(__file__).with_name("matmul_cpu.cc")
_TARGET = "tpustack_matmul_cpu"
_PACKED_TARGET = "tpustack_matmul_packed_cpu"
STREAM_ROWS = 8  # rows of x the streaming path folds per pass over w (matmul_cpu.cc kStreamRows)
PANEL = 48  # columns per packed panel (matmul_cpu.cc kPanelCols)
W_DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why not)."""
    return _native.load(_SOURCE, {_TARGET: "TpustackMatmulCpu", _PACKED_TARGET: "TpustackMatmulPackedCpu"},
                        flags=("-ffp-contract=fast",))


def unavailable(w_dtype=jnp.float32) -> str | None:
    """None when the native kernel takes w_dtype weights here (any M, K, N), else why not."""
    name = jnp.dtype(w_dtype).name
    if name not in W_DTYPES:
        return f"weights of {name}: the native matmul reads {W_DTYPES}"
    return _library()[1]


def matmul_cpu(x_MK: jax.Array, w_KN: jax.Array) -> jax.Array:
    """x [M, K] @ w [K, N] in f32 (w f32 or bf16); [M, N] f32."""
    reason = unavailable(w_KN.dtype)
    if reason:
        raise RuntimeError(f"matmul (cpu): {reason}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((x_MK.shape[0], w_KN.shape[1]), jnp.float32),
                            vmap_method="sequential")
    return call(x_MK.astype(jnp.float32), w_KN)


def pack(w_KN: jax.Array) -> jax.Array:
    """w [K, N] as the packed kernel reads it: [ceil(N / 48), K, 48], panel p = columns 48p..48p+47
    (the last zero-padded); same dtype. Done once per weight (an inference engine's load)."""
    k, n = w_KN.shape
    pad = -n % PANEL
    w = jnp.pad(w_KN, ((0, 0), (0, pad))) if pad else w_KN
    return jnp.transpose(w.reshape(k, (n + pad) // PANEL, PANEL), (1, 0, 2))


def matmul_packed_cpu(x_MK: jax.Array, w_PKC: jax.Array, n: int) -> jax.Array:
    """x [M, K] @ w (packed by `pack` from [K, n]) in f32; [M, n] f32."""
    reason = unavailable(w_PKC.dtype)
    if reason:
        raise RuntimeError(f"matmul (cpu, packed): {reason}")
    if w_PKC.ndim != 3 or w_PKC.shape[0] != -(-n // PANEL) or w_PKC.shape[2] != PANEL or w_PKC.shape[1] != x_MK.shape[1]:
        raise ValueError(f"matmul (cpu, packed): w {w_PKC.shape} is not a packed [{x_MK.shape[1]}, {n}]")
    call = jax.ffi.ffi_call(_PACKED_TARGET, jax.ShapeDtypeStruct((x_MK.shape[0], n), jnp.float32),
                            vmap_method="sequential")
    return call(x_MK.astype(jnp.float32), w_PKC)
