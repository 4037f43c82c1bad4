"""NF4 (QLoRA's NormalFloat-4) with double quantization, bit-equal to bitsandbytes on CPU.

A tensor is flattened row-major and cut into blocks of 64; each block is scaled by its
absmax and every value rounds to the nearest of the 16 NF4 levels (codes packed two a
byte, the first value of a pair in the high nibble). The per-block absmax values are then
double-quantized: their mean is subtracted (`absmax_offset`) and the rest is stored as
8-bit codes of bitsandbytes' signed dynamic map in blocks of 256 with their own f32 absmax
(`absmax_scale`). Storage: 4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

Quantization runs once on the host (numpy); `dequantize_nf4` is jnp, so a model can expand
NF4 weights on the fly inside jit (tpustack.model.quant, weight_quant="nf4").
"""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np

BLOCK = 64  # values per absmax (QLoRA)
ABSMAX_BLOCK = 256  # absmax values per second-level scale (double quantization)

# The 16 NormalFloat-4 levels of the QLoRA paper, as float32 (bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], dtype=np.float32)


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace rounded as torch's CPU kernel rounds it (fused multiply-add from each end)."""
    f32, f64 = np.float32, np.float64
    step = f64(f32((f32(end) - f32(start)) / f32(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    from_start = f64(f32(start)) + i * step
    from_end = f64(f32(end)) - (steps - 1 - i) * step
    return np.where(i < steps // 2, from_start, from_end).astype(np.float32)


@functools.lru_cache(maxsize=1)
def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map()): 256 sorted float32 levels."""
    data: list[float] = []
    for i in range(7):  # exponent 10^-6 .. 10^0, 2^i fraction items each, both signs
        bounds = _torch_linspace(0.1, 1.0, 2 ** i + 1)
        means = (bounds[:-1] + bounds[1:]) / np.float32(2.0)
        data += (np.float32(10.0 ** (-6 + i)) * means).tolist()
        data += (-np.float32(10.0 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    return np.sort(np.array(data, np.float32))


def blockwise_codes(flat: np.ndarray, levels: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' torch reference quantizer: per block x * (1/absmax), clamped to [-1, 1], then
    the level whose midpoint interval holds it (bucketize). -> (codes u8, absmax per block f32);
    a ragged last block is its own."""
    blocks = math.ceil(flat.size / block)
    padded = np.zeros(blocks * block, np.float32)
    padded[: flat.size] = flat
    padded = padded.reshape(blocks, block)
    absmax_B = np.abs(padded).max(axis=1)
    inv_B = np.float32(1.0) / np.maximum(absmax_B, np.float32(1e-38))
    scaled = np.clip(padded * inv_B[:, None], -1, 1).reshape(-1)[: flat.size]
    midpoints = (levels[:-1] + levels[1:]) / np.float32(2.0)
    return np.searchsorted(midpoints, scaled, side="left").astype(np.uint8), absmax_B


def quantize_nf4(w: np.ndarray) -> dict[str, np.ndarray]:
    """Any float tensor -> {codes [ceil(n/2)] u8, absmax_codes [n/64] u8, absmax_scale [n/64/256] f32,
    absmax_offset [1] f32}, the arrays of bitsandbytes' quantize_4bit(nf4, compress_statistics=True)."""
    flat = np.asarray(w, np.float32).reshape(-1)
    q, absmax = blockwise_codes(flat, NF4_LEVELS, BLOCK)
    if q.size % 2:
        q = np.append(q, np.uint8(np.searchsorted((NF4_LEVELS[:-1] + NF4_LEVELS[1:]) / 2, 0.0)))
    codes = (q[0::2] << 4) | q[1::2]
    # bitsandbytes takes torch's float32 mean, whose summation order can differ from this
    # f64 mean in the last bit (tests compare the double quantization given one offset).
    offset = np.float32(np.mean(absmax, dtype=np.float64))
    absmax_codes, absmax_scale = blockwise_codes(absmax - offset, dynamic_map(), ABSMAX_BLOCK)
    return {"codes": codes.astype(np.uint8), "absmax_codes": absmax_codes, "absmax_scale": absmax_scale,
            "absmax_offset": np.array([offset], np.float32)}


def dequantize_nf4(q: dict, shape: tuple[int, ...]) -> jnp.ndarray:
    """The f32 tensor of `shape` that quantize_nf4's arrays stand for (jnp: usable inside jit)."""
    n = math.prod(shape)
    levels, dyn = jnp.asarray(NF4_LEVELS), jnp.asarray(dynamic_map())
    absmax = dyn[q["absmax_codes"].astype(jnp.int32)]
    absmax = absmax * jnp.repeat(q["absmax_scale"], ABSMAX_BLOCK)[: absmax.shape[0]] + q["absmax_offset"][0]
    codes = q["codes"].astype(jnp.int32)
    idx = jnp.stack([codes >> 4, codes & 0xF], axis=-1).reshape(-1)[:n]
    return (levels[idx] * jnp.repeat(absmax, BLOCK)[:n]).reshape(shape)


def nf4_shapes(n: int) -> dict[str, tuple[int, ...]]:
    """Shapes of quantize_nf4's arrays for a tensor of n values (the model's param shapes)."""
    blocks = math.ceil(n / BLOCK)
    return {"codes": (math.ceil(n / 2),), "absmax_codes": (blocks,),
            "absmax_scale": (math.ceil(blocks / ABSMAX_BLOCK),), "absmax_offset": (1,)}


def nf4_bits_per_param(q: dict, n: int) -> float:
    """Stored bits per parameter of quantize_nf4's arrays (measured from their bytes)."""
    return 8.0 * sum(np.asarray(a).nbytes for a in q.values()) / n
