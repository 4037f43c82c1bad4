"""Paged decode attention on CPU: paged_attention_cpu.cc, an XLA FFI custom call.

XLA's CPU gathers copy every page before tiny batched dots (~3 GB/s on a 2-core VM); the
native kernel streams pages in place, a row (all its heads) at a time on XLA's own intra-op
thread pool. It is built with the system C++ compiler on first use (a few seconds)
into a cache keyed by its source, the compiler flags, jax's FFI headers and this CPU
($TPUSTACK_KERNEL_CACHE, else ~/.cache/tpustack/kernels, else a temp folder), and registered
with jax once.
Where it cannot be built (no compiler, a failed build), `unavailable()` says why and callers
use XLA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_SOURCE = Path(__file__).with_name("paged_attention_cpu.cc")
_TARGET = "tpustack_paged_attention_cpu"
_WRITE_TARGET = "tpustack_write_slots_cpu"
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")
PAGE_DTYPES = ("float32", "bfloat16")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line  # the first of them: the model, or the ISA where there is no model
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cache_dirs() -> list[Path]:
    """Where the built library may live: $TPUSTACK_KERNEL_CACHE, else ~/.cache/tpustack/kernels,
    then a per-user temp directory (a read-only home still gets the kernel)."""
    first = os.environ.get("TPUSTACK_KERNEL_CACHE") or Path.home() / ".cache" / "tpustack" / "kernels"
    return [Path(first), Path(tempfile.gettempdir()) / f"tpustack-kernels-{os.getuid()}"]


def _build(lib: Path, compiler: str, include: Path) -> str | None:
    """Compile the kernel into lib (atomically: parallel test workers agree on one file); why not."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [compiler, *_FLAGS, f"-I{include}", str(_SOURCE), "-o", tmp]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        return f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}"
    os.replace(tmp, lib)
    return None


@functools.lru_cache(maxsize=None)
def _library() -> tuple[ctypes.CDLL | None, str | None]:
    """(the loaded library, None) or (None, why not)."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler on PATH (set CXX, or install g++)"
    include = Path(jax.ffi.include_dir())
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), (include / "xla" / "ffi" / "api" / "ffi.h").read_bytes(),
                 " ".join((compiler, *_FLAGS)).encode(), _cpu_name().encode()):
        key.update(part)
    name = f"paged_attention_cpu-{key.hexdigest()[:16]}.so"
    why = "no writable cache directory"
    for folder in _cache_dirs():
        lib = folder / name
        try:
            why = None if lib.exists() else _build(lib, compiler, include)
            if why is not None:  # the compiler refused: another folder would not change that
                return None, why
            handle = ctypes.cdll.LoadLibrary(str(lib))
            break
        except OSError as e:  # unwritable folder, or a library that does not load: try the next
            why = f"{lib}: {e}"
    else:
        return None, why
    jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(handle.TpustackPagedAttentionCpu), platform="cpu")
    jax.ffi.register_ffi_target(_WRITE_TARGET, jax.ffi.pycapsule(handle.TpustackWriteSlotsCpu), platform="cpu")
    return handle, None


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
