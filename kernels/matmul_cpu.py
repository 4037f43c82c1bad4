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
STREAM_ROWS = 8  # rows of x the streaming path folds per pass over w (matmul_cpu.cc kStreamRows)
W_DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why not)."""
    return _native.load(_SOURCE, {_TARGET: "TpustackMatmulCpu"}, flags=("-ffp-contract=fast",))


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
