"""Which platform jax should start, decided before jax is imported (so this module imports
no jax): TPU and GPU visibility from the host's devices.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"


def tpu_visible() -> bool:
    """jax's own test (a Google PCI device), or /dev/accel* (v2-v4, v5p) or /dev/vfio/N (v5e, v6e)."""
    if glob.glob("/dev/accel*") or any(not n.endswith("/vfio") for n in glob.glob("/dev/vfio/*")):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            pass
    return False


def gpu_visible() -> bool:
    return any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd"))


def choose_platform() -> None:
    """Set JAX_PLATFORMS and libtpu's variables (only where unset) so a machine without a TPU
    starts jax quietly.

    libtpu (the tpu extra, installed for ahead-of-time compiles) prints start-up errors on a
    machine without a TPU: with JAX_PLATFORMS unset jax initialises every registered backend,
    and its TPU backend loads libtpu, which looks for TPU metadata and peers before jax falls
    back to cpu; compile-check loads it too. Where no TPU is visible (jax's own test: a Google
    PCI device; /dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e), tell libtpu this host is alone
    (virtual topologies and their compiles are unchanged; several processes may load it), and
    with no GPU either choose cpu, before jax is imported. What the user set (JAX_PLATFORMS even
    empty) is kept.
    """
    if (sys.platform.startswith("linux") and "JAX_FORCE_TPU_INIT" not in os.environ
            and importlib.util.find_spec("libtpu") is not None and not tpu_visible()):
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # its lockfile guards chips this host lacks
        if not gpu_visible():
            os.environ.setdefault("JAX_PLATFORMS", "cpu")
