"""The one place that imports Pallas: jax 0.10.2 here, 0.11.x on the GPU machines.

Pallas moves between releases (0.10 already defaults GPU kernels to Mosaic GPU, 0.11
deprecates the Triton lowering), so every kernel module takes `pl`, `pltpu`,
`pltriton` and the helpers below from here and never imports jax.experimental.pallas
itself. Feature flags say what this jax offers; a kernel whose backend is missing
falls back to XLA with a logged reason instead of failing at import.

Also here: `pallas_call`, a thin wrapper that (a) picks interpret mode off an
accelerator, and (b) when `poison_outputs()` is active, aliases every output to a
NaN-filled input so a tile the kernel never writes shows up as NaN in tests.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

log = logging.getLogger("tpustack.kernels")

try:  # core Pallas: present in every release we support
    from jax.experimental import pallas as pl
    HAS_PALLAS = True
except ImportError:  # pragma: no cover - jax without Pallas
    pl = None  # type: ignore[assignment]
    HAS_PALLAS = False

try:  # Mosaic TPU
    from jax.experimental.pallas import tpu as pltpu
    HAS_TPU = HAS_PALLAS and hasattr(pltpu, "PrefetchScalarGridSpec")
except ImportError:  # pragma: no cover
    pltpu = None  # type: ignore[assignment]
    HAS_TPU = False

try:  # Triton lowering for GPU: deprecated in 0.11, may vanish later
    from jax.experimental.pallas import triton as pltriton
    HAS_TRITON = HAS_PALLAS and hasattr(pltriton, "CompilerParams")
except ImportError:  # pragma: no cover
    pltriton = None  # type: ignore[assignment]
    HAS_TRITON = False

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
# Kernels compute masked logits with a large finite value, never -inf, so that
# exp(m_prev - m_new) stays finite on rows that start fully masked.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


class KernelShapeError(ValueError):
    """A shape, dtype or tiling the Pallas kernel cannot take; the message names the fix."""


def _mesh_platform() -> str | None:
    """The platform of the mesh set for this trace (jax.set_mesh), or None when none is set.

    A compile for a libtpu virtual topology runs on a CPU host: its mesh holds TPU devices
    while jax.default_backend() says 'cpu'. The abstract mesh carries its devices' platform,
    inside jit and shard_map bodies too (jax.sharding.get_mesh() refuses to run under jit)."""
    dev = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return getattr(dev, "platform", None)


def backend() -> str:
    """The platform this trace compiles for: 'tpu', 'gpu' or 'cpu'.

    The set mesh's devices when there is one (a TPU topology compiled on a CPU host is
    'tpu'), else jax's default backend."""
    p = _mesh_platform() or jax.default_backend()
    return "gpu" if p in ("cuda", "rocm", "gpu") else p


def tpu_params(semantics: Sequence[str], vmem_limit_bytes: int | None = None) -> Any:
    """Mosaic compiler params across releases (the class was TPUCompilerParams before 0.6)."""
    cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
    kw: dict[str, Any] = {"dimension_semantics": tuple(semantics)}
    if vmem_limit_bytes is not None:
        kw["vmem_limit_bytes"] = vmem_limit_bytes
    return cls(**kw)


def triton_params(num_warps: int = 4, num_stages: int = 2) -> Any:
    """Triton params: passing them explicitly selects the Triton lowering even where
    Mosaic GPU is the default (jax >= 0.10)."""
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def vmem_scratch(shape: tuple[int, ...], dtype: Any) -> Any:
    """A VMEM scratch buffer (pltpu.VMEM moved from MemorySpace to a callable over releases)."""
    return pltpu.VMEM(shape, dtype)


def smem_spec() -> Any:
    """BlockSpec placing a whole small array in SMEM (scalars read by the kernel)."""
    space = getattr(pltpu, "SMEM", None) or pltpu.MemorySpace.SMEM
    return pl.BlockSpec(memory_space=space)


# ---- interpret mode and output poisoning -------------------------------------------

_POISON = [False]


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Within this context, interpret-mode kernels start from NaN (or -1) outputs."""
    prev = _POISON[0]
    _POISON[0] = enabled
    try:
        yield
    finally:
        _POISON[0] = prev


def resolve_interpret(interpret: bool | None) -> bool:
    """None means: interpret exactly when the target (backend(): the mesh's devices, else the
    default backend) is no accelerator to lower to."""
    return backend() == "cpu" if interpret is None else bool(interpret)


# name -> bytes: what a call's blocks need in VMEM (double-buffered in/out blocks plus
# scratch). libtpu's compile does not report Mosaic VMEM through memory_analysis(),
# so the AOT tests record this estimate beside the compiled program's HBM figures.
VMEM_ESTIMATE: dict[str, int] = {}


def _block_bytes(spec: Any, shape: tuple[int, ...], dtype: Any) -> int:
    blk = getattr(spec, "block_shape", None)
    dims = shape if blk is None else [1 if d is None or not isinstance(d, int) else d for d in blk]
    n = 1
    for d in dims:
        n *= int(d)
    return n * jnp.dtype(dtype).itemsize


def _vmem_bytes(args, in_specs, out_shape, out_specs, scratch_shapes) -> int:
    total = sum(2 * _block_bytes(sp, a.shape, a.dtype) for a, sp in zip(args, in_specs))
    total += sum(2 * _block_bytes(sp, o.shape, o.dtype) for o, sp in zip(out_shape, out_specs))
    for s in scratch_shapes:
        shape, dtype = getattr(s, "shape", ()), getattr(s, "dtype", jnp.float32)
        total += _block_bytes(None, tuple(shape), dtype)
    return total


def _poison_value(dtype: Any) -> Any:
    return jnp.nan if jnp.issubdtype(dtype, jnp.floating) else -1


def pallas_call(
    kernel: Callable[..., None],
    *,
    out_shape: Sequence[jax.ShapeDtypeStruct],
    grid: tuple[int, ...],
    in_specs: Sequence[Any],
    out_specs: Sequence[Any],
    scratch_shapes: Sequence[Any] = (),
    num_scalar_prefetch: int = 0,
    compiler_params: Any = None,
    interpret: bool = False,
    name: str | None = None,
) -> Callable[..., tuple[jax.Array, ...]]:
    """pl.pallas_call with list outputs, scalar prefetch and test-time NaN poisoning."""
    out_shape = list(out_shape)
    in_specs, out_specs = list(in_specs), list(out_specs)
    poison = _POISON[0] and interpret
    n_in = len(in_specs) + num_scalar_prefetch
    body = kernel
    aliases: dict[int, int] = {}
    if poison:
        # Extra inputs (after the real ones) alias the outputs; the kernel never sees them.
        in_specs = in_specs + out_specs
        aliases = {n_in + i: i for i in range(len(out_shape))}

        def body(*refs):  # noqa: F811 - deliberate rebinding
            return kernel(*refs[:n_in], *refs[n_in + len(out_shape):])

    if num_scalar_prefetch:
        grid_spec = pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=num_scalar_prefetch, grid=grid, in_specs=in_specs,
            out_specs=out_specs, scratch_shapes=list(scratch_shapes))
        call = pl.pallas_call(body, out_shape=out_shape, grid_spec=grid_spec,
                              input_output_aliases=aliases, compiler_params=compiler_params,
                              interpret=interpret, name=name)
    else:
        call = pl.pallas_call(body, out_shape=out_shape, grid=grid, in_specs=in_specs,
                              out_specs=out_specs, scratch_shapes=list(scratch_shapes),
                              input_output_aliases=aliases, compiler_params=compiler_params,
                              interpret=interpret, name=name)

    def run(*args):
        if not interpret:
            VMEM_ESTIMATE[name or "kernel"] = _vmem_bytes(args[num_scalar_prefetch:], in_specs, out_shape,
                                                          out_specs, scratch_shapes)
        if poison:
            args = args + tuple(jnp.full(s.shape, _poison_value(s.dtype), s.dtype) for s in out_shape)
        return tuple(call(*args))

    return run
