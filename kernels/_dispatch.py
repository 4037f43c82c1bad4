"""impl= selection shared by every public kernel: auto | pallas | xla | reference."""

from __future__ import annotations

from typing import Callable

from . import compat

IMPLS = ("auto", "pallas", "xla", "reference")
_logged: set[tuple[str, str]] = set()


def choose(
    name: str,
    impl: str,
    check: Callable[[str], str | None],
    platform: str | None = None,
) -> tuple[str, str]:
    """Returns (impl, platform) with impl in {'pallas','xla','reference'}.

    `check(platform)` returns None when the Pallas kernel takes the inputs, or a reason.
    impl='pallas' raises KernelShapeError with that reason; impl='auto' falls back to XLA
    and logs the reason once. On CPU, 'auto' means XLA (interpret mode is for tests)
    and 'pallas' interprets the TPU kernel unless platform='gpu' is asked for.
    """
    if impl not in IMPLS:
        raise compat.KernelShapeError(f"{name}: impl={impl!r}; use one of {IMPLS}")
    if impl in ("xla", "reference"):
        return impl, platform or compat.backend()
    dev = compat.backend()
    plat = platform or (dev if dev in ("tpu", "gpu") else "tpu")
    if impl == "auto" and dev == "cpu" and platform is None:
        return "xla", dev
    reason = None
    if plat == "tpu" and not compat.HAS_TPU:
        reason = "this jax has no Pallas TPU (Mosaic) support"
    elif plat == "gpu" and not compat.HAS_TRITON:
        reason = "this jax has no Pallas Triton lowering (GPU kernels here are Triton-style)"
    elif plat not in ("tpu", "gpu"):
        reason = f"no Pallas kernel for platform {plat!r}"
    reason = reason or check(plat)
    if reason is None:
        return "pallas", plat
    if impl == "pallas":
        raise compat.KernelShapeError(f"{name} (pallas, {plat}): {reason}")
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        compat.log.warning("%s: falling back to XLA on %s: %s", name, plat, reason)
    return "xla", plat


def round_up(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x."""
    return -(-x // m) * m


def is_pow2(x: int) -> bool:
    """True for 1, 2, 4, ..."""
    return x > 0 and x & (x - 1) == 0
