"""impl= selection shared by every public kernel: auto | pallas | xla | reference, and cpu for a
kernel with a native CPU implementation (paged_attention)."""

from __future__ import annotations

from typing import Callable

from . import compat

IMPLS = ("auto", "pallas", "xla", "reference", "cpu")
_logged: set[tuple[str, str]] = set()


def choose(
    name: str,
    impl: str,
    check: Callable[[str], str | None],
    platform: str | None = None,
    native: Callable[[], str | None] | None = None,
) -> tuple[str, str]:
    """Returns (impl, platform) with impl in {'pallas','xla','reference','cpu'}.

    `check(platform)` returns None when the Pallas kernel takes the inputs, or a reason.
    impl='pallas' raises KernelShapeError with that reason; impl='auto' falls back to XLA
    and logs the reason once. On CPU, 'auto' means XLA (interpret mode is for tests)
    and 'pallas' interprets the TPU kernel unless platform='gpu' is asked for. A kernel with a
    native CPU implementation passes `native()` (None when it runs here, else why not): on a
    CPU backend 'auto' picks it when it can, and impl='cpu' insists on it.
    """
    if impl not in IMPLS:
        raise compat.KernelShapeError(f"{name}: impl={impl!r}; use one of {IMPLS}")
    if impl in ("xla", "reference"):
        return impl, platform or compat.backend()
    dev = compat.backend()
    if impl == "cpu" or (impl == "auto" and dev == "cpu" and platform is None and native is not None):
        reason = native() if native is not None else "there is no native CPU kernel for it"
        if reason is None:
            return "cpu", "cpu"
        if impl == "cpu":
            raise compat.KernelShapeError(f"{name} (cpu): {reason}")
        _log_once(name, "cpu", reason)
        return "xla", dev
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
    _log_once(name, plat, reason)
    return "xla", plat


def _log_once(name: str, plat: str, reason: str) -> None:
    if (name, reason) not in _logged:
        _logged.add((name, reason))
        compat.log.warning("%s: falling back to XLA on %s: %s", name, plat, reason)


def round_up(x: int, m: int) -> int:
    """Smallest multiple of m that is >= x."""
    return -(-x // m) * m


def is_pow2(x: int) -> bool:
    """True for 1, 2, 4, ..."""
    return x > 0 and x & (x - 1) == 0
