"""Paged decode attention on CPU: paged_attention_cpu.cc, an XLA FFI custom call.

XLA's CPU gathers copy every page before tiny batched dots (~3 GB/s on a 2-core VM); the
native kernel streams pages in place, a row (all its heads) at a time on XLA's own intra-op
thread pool. It is built with the system C++ compiler on first use (kernels/_native.py).
Where it cannot be built (no compiler, a failed build), `unavailable()` says why and callers
use XLA.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from . import _native

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cc")
_TARGET = "tpustack_paged_attention_cpu"
_WRITE_TARGET = "tpustack_write_slots_cpu"
_TILE_TARGET = "tpustack_tile_attention_cpu"
PAGE_DTYPES = ("float32", "bfloat16")


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why not)."""
    return _native.load(_SOURCE, {_TARGET: "TpustackPagedAttentionCpu", _WRITE_TARGET: "TpustackWriteSlotsCpu",
                                  _TILE_TARGET: "TpustackTileAttentionCpu"})


def unavailable(page_dtype=None, head_dim: int = 16, quantized: bool = False) -> str | None:
    """None when the native kernel takes these pages here, else the reason it does not."""
    if head_dim % 16:
        return f"head_dim {head_dim}: the native kernel works in 16-lane vectors (a multiple of 16)"
    if quantized:
        return "int8 pages with scales run on XLA"
    if page_dtype is not None and jnp.dtype(page_dtype).name not in PAGE_DTYPES:
        return f"pages of {jnp.dtype(page_dtype).name}: the native kernel reads {PAGE_DTYPES}"
    return _library()[1]


def paged_attention_cpu(q_SNH: jax.Array, k_pages_PLKH: jax.Array, v_pages_PLKH: jax.Array, table_SM: jax.Array,
                        lengths_S: jax.Array, sm_scale: float, soft_cap: float | None = None) -> jax.Array:
    """Each row's query heads over the first lengths[s] keys of its pages; [S, N, H] f32."""
    reason = unavailable(k_pages_PLKH.dtype, k_pages_PLKH.shape[3])
    if reason:
        raise RuntimeError(f"paged_attention (cpu): {reason}")
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q_SNH.shape, jnp.float32), vmap_method="sequential")
    return call(q_SNH.astype(jnp.float32), k_pages_PLKH, v_pages_PLKH,  # one dtype: the kernel checks
                table_SM.astype(jnp.int32), lengths_S.astype(jnp.int32),
                scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0))


def tile_attention_cpu(q_TNH: jax.Array, k_pages_PLKH: jax.Array, v_pages_PLKH: jax.Array, table_XM: jax.Array,
                       pos_XQ: jax.Array, tok_XQ: jax.Array, sm_scale: float) -> jax.Array:
    """Causal attention of query tiles (a prefill chunk) straight from and into the step's rows:
    tile x's token i is row tok[x, i] of q (outside [0, T): padding) at position pos[x, i] (-1:
    padding), over its sequence's keys 0..pos[x, i], read in place from the pages through
    table[x]; [T, N, H] f32, zeros in the rows no tile names."""
    reason = unavailable(k_pages_PLKH.dtype, k_pages_PLKH.shape[3])
    if reason:
        raise RuntimeError(f"tile attention (cpu): {reason}")
    call = jax.ffi.ffi_call(_TILE_TARGET, jax.ShapeDtypeStruct(q_TNH.shape, jnp.float32), vmap_method="sequential")
    return call(q_TNH.astype(jnp.float32), k_pages_PLKH, v_pages_PLKH, table_XM.astype(jnp.int32),
                pos_XQ.astype(jnp.int32), tok_XQ.astype(jnp.int32), scale=np.float32(sm_scale))


def write_slots_cpu(pages_PLKH: jax.Array, page_T: jax.Array, slot_T: jax.Array, rows_TKH: jax.Array) -> jax.Array:
    """pages.at[page_T, slot_T].set(rows_TKH) written in place by the native kernel (f32 or bf16
    pages, rounded to nearest even as XLA's convert): XLA CPU turns a bf16 scatter into a copy
    of the whole pool to f32 and back."""
    reason = unavailable(pages_PLKH.dtype)
    if reason:
        raise RuntimeError(f"write_slots (cpu): {reason}")
    call = jax.ffi.ffi_call(_WRITE_TARGET, jax.ShapeDtypeStruct(pages_PLKH.shape, pages_PLKH.dtype),
                            input_output_aliases={0: 0})
    return call(pages_PLKH, rows_TKH.astype(jnp.float32), page_T.astype(jnp.int32), slot_T.astype(jnp.int32))
