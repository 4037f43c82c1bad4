"""Accelerator specs (per chip) from public sources, and a CPU peak measured on demand.

Dense (no sparsity) peak rates; 0 where the chip has no faster path for that type.
Interconnect: bytes/s per chip, all links summed (ICI on TPU, NVLink on NVIDIA).
Prices: on-demand $ per chip-hour, us-central, as published when this table was written;
pass --price to `tpustack estimate` for yours.
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
    fp8_flops: float = 0.0  # FLOP/s, dense fp8 (0: no fp8 matmul unit)
    dollars_per_hour: float = 0.0  # on-demand, one chip


GiB, GB, T = 2**30, 1e9, 1e12

CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4 "System architecture": 275 TFLOP/s bf16 and int8,
    # 32 GiB HBM2 at 1228 GB/s, ICI 2400 Gbps; cloud.google.com/tpu/pricing (us-central2).
    "v4": Chip("TPU v4", 275 * T, 275 * T, 32 * GiB, 1228 * GB, 300 * GB, 0.0, 3.22),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 394 TOP/s int8, 16 GiB at 819 GB/s,
    # ICI 1600 Gbps; pricing page: $1.20/chip-hour.
    "v5e": Chip("TPU v5e", 197 * T, 394 * T, 16 * GiB, 819 * GB, 200 * GB, 0.0, 1.20),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 918 TOP/s int8, 95 GiB at 2765 GB/s,
    # ICI 4800 Gbps; pricing page: $4.20/chip-hour.
    "v5p": Chip("TPU v5p", 459 * T, 918 * T, 95 * GiB, 2765 * GB, 600 * GB, 0.0, 4.20),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 1836 TOP/s int8, 32 GiB at 1640 GB/s,
    # ICI 3584 Gbps; pricing page: $2.70/chip-hour.
    "v6e": Chip("TPU v6e", 918 * T, 1836 * T, 32 * GiB, 1640 * GB, 448 * GB, 0.0, 2.70),
    # NVIDIA A100 datasheet (2021): 312 TFLOP/s bf16, 624 TOP/s int8 dense, no fp8,
    # 1555 / 2039 GB/s HBM, NVLink 3 600 GB/s; GCP a2 on-demand per GPU ~$3.67 / ~$5.07.
    "a100-40gb": Chip("NVIDIA A100 40GB", 312 * T, 624 * T, 40 * GB, 1555 * GB, 600 * GB, 0.0, 3.67),
    "a100-80gb": Chip("NVIDIA A100 80GB", 312 * T, 624 * T, 80 * GB, 2039 * GB, 600 * GB, 0.0, 5.07),
    # NVIDIA H100 datasheet (2023), SXM: 989 TFLOP/s bf16, 1979 fp8 / int8 dense, 80 GB at
    # 3.35 TB/s, NVLink 4 900 GB/s; GCP a3-highgpu per GPU ~$11.06.
    "h100": Chip("NVIDIA H100 SXM", 989 * T, 1979 * T, 80 * GB, 3350 * GB, 900 * GB, 1979 * T, 11.06),
    # NVIDIA H200 datasheet (2024): H100's compute, 141 GB at 4.8 TB/s, NVLink 900 GB/s;
    # GCP a3-ultragpu per GPU ~$10.60 (varies by region: pass --price).
    "h200": Chip("NVIDIA H200", 989 * T, 1979 * T, 141 * GB, 4800 * GB, 900 * GB, 1979 * T, 10.60),
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
    import os

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # host RAM plays HBM's part
    return Chip("cpu", flops, 0.0, float(ram), bandwidth, 0.0)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

