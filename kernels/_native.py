"""Native CPU kernels (XLA FFI custom calls written in C++): built with the system C++ compiler
on first use (a few seconds) into a cache keyed by the source, the compiler flags, jax's FFI
headers and this CPU ($TPUSTACK_KERNEL_CACHE, else ~/.cache/tpustack/kernels, else a per-user
temp folder), loaded, and their handlers registered with jax once.

Where a kernel cannot be built (no compiler, a failed build), `load` says why and its callers
use XLA: a native kernel is a speed-up, never a requirement.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-std=c++17", "-shared", "-fPIC")


def cpu_name() -> str:
    """The CPU model line of /proc/cpuinfo (or its ISA flags where there is no model)."""
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


def _build(source: Path, lib: Path, cmd_head: list[str], link: tuple[str, ...]) -> str | None:
    """Compile source into lib (atomically: parallel test workers agree on one file); why not."""
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    cmd = [*cmd_head, str(source), "-o", tmp, *link]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        os.unlink(tmp)
        return f"{' '.join(cmd)} failed: {done.stderr.strip().splitlines()[-1:]}"
    os.replace(tmp, lib)
    return None


def load(source: Path, targets: dict[str, str], flags: tuple[str, ...] = (),
         link: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str | None]:
    """Build (once per key; sources include cpu_common.h beside them) and load `source`; register each {jax target name: exported handler
    symbol} for the CPU platform. Returns (the library, None) or (None, why not). Callers cache it."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None, "no C++ compiler on PATH (set CXX, or install g++)"
    include = Path(jax.ffi.include_dir())
    cmd_head = [compiler, *FLAGS, *flags, f"-I{source.parent}", f"-I{include}"]
    key = hashlib.sha256()
    for part in (source.read_bytes(), (source.parent / "cpu_common.h").read_bytes(),
                 (include / "xla" / "ffi" / "api" / "ffi.h").read_bytes(),
                 " ".join((compiler, *FLAGS, *flags, *link)).encode(), cpu_name().encode()):
        key.update(part)
    name = f"{source.stem}-{key.hexdigest()[:16]}.so"
    why = "no writable cache directory"
    for folder in _cache_dirs():
        lib = folder / name
        try:
            why = None if lib.exists() else _build(source, lib, cmd_head, link)
            if why is not None:  # the compiler refused: another folder would not change that
                return None, why
            handle = ctypes.cdll.LoadLibrary(str(lib))
            break
        except OSError as e:  # unwritable folder, or a library that does not load: try the next
            why = f"{lib}: {e}"
    else:
        return None, why
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(handle, symbol)), platform="cpu")
    return handle, None
