"""Accelerator specs (per chip) from public sources, and a CPU peak measured on demand.

Dense (no sparsity) peak rates; 0 where the chip has no faster path for that type.
Interconnect: bytes/s per chip, all links summed (ICI on TPU, NVLink on NVIDIA).
Prices: on-demand $ per chip-hour, us-central, as published when this table was written;
pass --price to `tpustack estimate` for yours.

Two more properties feed the roofline's *prediction* (the ceiling uses only P and B):
`stream`, the bandwidth one op reaches reading weights that are in no cache, by how many
bytes the op reads (a table), and `op_latency`, the fixed cost of one separately executed
op. For "cpu" both are measured (`measure_cpu_streams`). For the accelerators the table leaves
them empty / 0: the prediction uses the datasheet HBM bandwidth at every size and no
per-op cost (XLA fuses a decode step into one program that runs its ops back to back on
the chip, and no vendor publishes a per-op cost inside such a program), i.e. the ceiling.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import math
import os
import time

import jax
import jax.numpy as jnp

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
    # ((bytes one op reads, bytes/s it reaches), ...) from cold caches, ascending; (): hbm_bandwidth
    stream: tuple[tuple[float, float], ...] = ()
    op_latency: float = 0.0  # s: fixed cost per op beyond its bytes and FLOPs (0: not modelled)
    # the on-chip heap XLA TPU's memory-space assignment places whole buffers in (VMEM, memory
    # space 1), as its buffer assignments size it (0: none, or not read)
    onchip_bytes: float = 0.0

    def cold_bandwidth(self, nbytes: float) -> float:
        """Bytes/s of one op reading `nbytes` from no cache: the `stream` table, interpolated in
        log(bytes) between its sizes and held flat beyond them; the datasheet B without one."""
        if not self.stream:
            return self.hbm_bandwidth
        sizes = [s for s, _ in self.stream]
        if nbytes <= sizes[0]:
            return self.stream[0][1]
        for (s0, b0), (s1, b1) in zip(self.stream, self.stream[1:]):
            if nbytes <= s1:
                f = math.log(nbytes / s0) / math.log(s1 / s0)
                return b0 + f * (b1 - b0)
        return self.stream[-1][1]


GiB, MiB, GB, T = 2**30, 2**20, 1e9, 1e12

CHIPS: dict[str, Chip] = {
    # cloud.google.com/tpu/docs/v4 "System architecture": 275 TFLOP/s bf16 and int8,
    # 32 GiB HBM2 at 1228 GB/s, ICI 2400 Gbps; cloud.google.com/tpu/pricing (us-central2).
    "v4": Chip("TPU v4", 275 * T, 275 * T, 32 * GiB, 1228 * GB, 300 * GB, 0.0, 3.22),
    # cloud.google.com/tpu/docs/v5e: 197 TFLOP/s bf16, 394 TOP/s int8, 16 GiB at 819 GB/s,
    # ICI 1600 Gbps; pricing page: $1.20/chip-hour.
    "v5e": Chip("TPU v5e", 197 * T, 394 * T, 16 * GiB, 819 * GB, 200 * GB, 0.0, 1.20, onchip_bytes=112 * MiB),
    # cloud.google.com/tpu/docs/v5p: 459 TFLOP/s bf16, 918 TOP/s int8, 95 GiB at 2765 GB/s,
    # ICI 4800 Gbps; pricing page: $4.20/chip-hour.
    "v5p": Chip("TPU v5p", 459 * T, 918 * T, 95 * GiB, 2765 * GB, 600 * GB, 0.0, 4.20, onchip_bytes=48 * MiB),
    # cloud.google.com/tpu/docs/v6e: 918 TFLOP/s bf16, 1836 TOP/s int8, 32 GiB at 1640 GB/s,
    # ICI 3584 Gbps; pricing page: $2.70/chip-hour.
    "v6e": Chip("TPU v6e", 918 * T, 1836 * T, 32 * GiB, 1640 * GB, 448 * GB, 0.0, 2.70, onchip_bytes=96 * MiB),
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
    """A chip by table key (v5p, h100, ...) or "cpu" (measured, with the prediction's terms)."""
    key = name.lower()
    if key == "cpu":
        return measure_cpu_streams()
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
    """Peak f32 matmul FLOP/s and streaming gemv bandwidth of this host, as XLA reaches them
    (all MFU needs; `measure_cpu_streams` adds what the roofline's prediction needs)."""
    cpu = jax.devices("cpu")[0]
    n = 2048
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = min(_timed(lambda: matmul(a).block_until_ready()) for _ in range(3))
    flops = 2 * n**3 / best
    rows = 8192  # 8192 x 8192 f32 = 256 MiB: larger than most caches (not all: see cold_stream)
    w = jax.device_put(jnp.ones((rows, rows), jnp.float32), cpu)
    x = jax.device_put(jnp.ones((rows,), jnp.float32), cpu)
    gemv = jax.jit(lambda w, x: w @ x)
    gemv(w, x).block_until_ready()
    best = min(_timed(lambda: gemv(w, x).block_until_ready()) for _ in range(3))
    bandwidth = rows * rows * 4 / best
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")  # host RAM plays HBM's part
    return Chip("cpu", flops, 0.0, float(ram), bandwidth, 0.0)


@functools.lru_cache(maxsize=1)
def measure_cpu_streams() -> Chip:
    """measure_cpu's figures, measured afresh, plus the prediction's: the cold-stream bandwidth
    by op size (`cold_stream` at STREAM_SIZES) and the fixed cost of one op (`op_latency`).
    About 5 s; `tpustack estimate --chip cpu` uses it."""
    cpu = jax.devices("cpu")[0]
    base = measure_cpu.__wrapped__()
    latency, evict = op_latency(cpu), _evictor(cpu)
    stream = tuple((s, cold_stream(cpu, int(math.sqrt(s / 4)), latency, evict)) for s in STREAM_SIZES)
    # the ceiling takes the best rate any measurement reached (a noisy neighbour can slow either one)
    ceiling = max([base.hbm_bandwidth] + [b for _, b in stream])
    return dataclasses.replace(base, hbm_bandwidth=ceiling, stream=stream, op_latency=latency)


STREAM_SIZES = tuple(4 * n * n for n in (256, 512, 1024, 2048, 4096, 8192))  # f32 [n, n]: 256 KiB .. 256 MiB


def last_level_cache_bytes() -> int:
    """The largest CPU cache this host reports (sysfs), or 256 MiB where it reports none."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    return max(sizes, default=256 * 2**20)


def cold_stream(device, n: int, latency: float = 0.0, evict=None, total: float = 64 * 2**20,
                repeats: int = 3) -> float:
    """Bytes/s one op reaches reading an f32 weight [n, n] that is in no cache: a dependent
    chain x -> x @ W_i over distinct weights (the decode step's layout: x [1, n] times a
    [in, out] weight), every one evicted from the caches first, less `latency` per op. That
    is what decoding sees: one op after another, each streaming a weight read once per step,
    and a model's weights do not stay in cache from one step to the next."""

    count = max(1, int(total // (n * n * 4)))
    run = _matmul_chain(device, n, count)
    evict = evict or _evictor(device)
    times = []
    for _ in range(repeats):
        evict()
        times.append(_timed(run))
    return n * n * 4 / max(min(times) / count - latency, 1e-9)


def op_latency(device, count: int = 64, repeats: int = 10) -> float:
    """Seconds per op of a chain of dependent tiny matmuls ([1, 8] x [8, 8], all in L1): what
    the runtime spends to run one op, with no bytes or FLOPs to speak of."""
    run = _matmul_chain(device, 8, count)
    return min(_timed(run) for _ in range(repeats)) / count


def _matmul_chain(device, n: int, count: int):
    """A compiled, warmed-up x -> x @ W_i chain over `count` distinct f32 [n, n] weights
    (x [1, n]); returns a function that runs it once and waits. Every W_i is 1/n: x stays
    all ones (no denormals, no overflow)."""
    weights = [jax.device_put(jnp.full((n, n), 1.0 / n, jnp.float32), device) for _ in range(count)]
    x = jax.device_put(jnp.ones((1, n), jnp.float32), device)

    def chain(ws, x):
        for w in ws:
            x = x @ w
        return x

    chain = jax.jit(chain)
    chain(weights, x).block_until_ready()
    return lambda: chain(weights, x).block_until_ready()


def _evictor(device):
    """A function that reads twice the last-level cache, pushing everything else out of it."""
    size = min(2 * last_level_cache_bytes(), 2**30) // 4
    buf = jax.device_put(jnp.ones((size,), jnp.float32), device)
    total = jax.jit(jnp.sum)
    total(buf).block_until_ready()
    return lambda: total(buf).block_until_ready()


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start
