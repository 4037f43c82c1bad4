"""Accelerator specs (per chip) from public sources, and a CPU peak measured on demand.

Dense (no sparsity) peak rates. Sources:
- TPU v4 / v5e / v5p / v6e: cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e} "System architecture".
- A100: NVIDIA A100 datasheet (2021); H100 SXM: H100 datasheet (2023); H200: H200 datasheet (2024).
"""

from __future__ import annotations

import dataclasses
import functools
import time

from tpustack.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    peak_flops: float  # FLOP/s, dense bf16 (for "cpu": the measured f32 matmul rate)
    int8_ops: float  # OP/s, dense (0 where the chip has no faster int8 path)
    hbm_bytes: float
    hbm_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # bytes/s per chip (ICI / NVLink), one direction summed over links


GiB, GB, T = 2**30, 1e9, 1e12

CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 275 * T, 275 * T, 32 * GiB, 1228 * GB, 300 * GB),
    "v5e": Chip("TPU v5e", 197 * T, 394 * T, 16 * GiB, 819 * GB, 200 * GB),
    "v5p": Chip("TPU v5p", 459 * T, 918 * T, 95 * GiB, 2765 * GB, 600 * GB),
    "v6e": Chip("TPU v6e", 918 * T, 1836 * T, 32 * GiB, 1640 * GB, 448 * GB),
    "a100-40gb": Chip("NVIDIA A100 40GB", 312 * T, 624 * T, 40 * GB, 1555 * GB, 600 * GB),
    "a100-80gb": Chip("NVIDIA A100 80GB", 312 * T, 624 * T, 80 * GB, 2039 * GB, 600 * GB),
    "h100": Chip("NVIDIA H100 SXM", 989 * T, 1979 * T, 80 * GB, 3350 * GB, 900 * GB),
    "h200": Chip("NVIDIA H200", 989 * T, 1979 * T, 141 * GB, 4800 * GB, 900 * GB),
}

# jax's device_kind strings -> table keys.
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p", "tpu v5": "v5p",
                 "tpu v6 lite": "v6e", "tpu v6e": "v6e", "a100-sxm4-40gb": "a100-40gb",
                 "a100-sxm4-80gb": "a100-80gb", "h100": "h100", "h200": "h200"}


def chip(name: str) -> Chip:
    """A chip by table key (v5p, h100, ...) or "cpu" (measured)."""
    key = name.lower()
    if key == "cpu":
        return measure_cpu()
    if key not in CHIPS:
        raise UserError(f"--chip {name!r}: unknown; known: cpu, {', '.join(CHIPS)}")
    return CHIPS[key]


def chip_for_device(device) -> Chip:
    """The table entry for a jax device (CPU devices are measured once per process)."""
    kind = str(getattr(device, "device_kind", "cpu")).lower()
    if device.platform == "cpu":
        return measure_cpu()
    for prefix in sorted(_DEVICE_KINDS, key=len, reverse=True):
        if prefix in kind:
            return CHIPS[_DEVICE_KINDS[prefix]]
    return Chip(kind, 0.0, 0.0, 0.0, 0.0, 0.0)


@functools.lru_cache(maxsize=1)
def measure_cpu() -> Chip:
    """Peak f32 matmul FLOP/s and streaming gemv bandwidth of this host, as XLA reaches them."""
    import jax
    import jax.numpy as jnp

    cpu = jax.devices("cpu")[0]
    n = 2048
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(3))
    flops = 2 * n**3 / best
    rows = 8192  # 8192 x 8192 f32 = 256 MiB: far larger than any cache
    w = jax.device_put(jnp.ones((rows, rows), jnp.float32), cpu)
    x = jax.device_put(jnp.ones((rows,), jnp.float32), cpu)
    gemv = jax.jit(lambda w, x: w @ x)
    gemv(w, x).block_until_ready()
    best = min(_timed(lambda: gemv(w, x).block_until_ready()) for _ in range(3))
    bandwidth = rows * rows * 4 / best
    return Chip("cpu", flops, 0.0, 0.0, bandwidth, 0.0)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

