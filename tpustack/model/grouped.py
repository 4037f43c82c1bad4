"""Round-to-nearest quantization and the group-wise codes the model runs (weight_quant int4_zp).

Weights are [K, N] (K the input dim, N the output dim), as the model's matmuls hold them.
Group-wise: every `group` consecutive input rows of an output column share a scale and an
integer zero point (min-max, the grid GPTQ and AWQ use): w ~ (q - zero) * scale with
q in [0, 2^bits - 1]. GPTQ reuses `grid_params` / `round_to_grid` column by column.
Codes are stored in the int4 kernel's packed layout (tpustack.kernels: rows i and i + K/2
share a byte, signed nibbles), as q - 8, so 3-bit codes use 8 of its 16 levels.
"""

from __future__ import annotations

import numpy as np

from tpustack.kernels import quantize_int8  # noqa: F401 - int8 per-channel is the kernels' own


def grid_params(w_GN: np.ndarray, bits: int, sym: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Min-max grid of a group of rows [G, N] (the range always holds 0): (scale [N], zero [N]).
    sym: [-absmax, absmax] with the zero point fixed mid-range (GPTQ's --sym; qwix's int grid)."""
    maxq = 2 ** bits - 1
    lo = np.minimum(w_GN.min(axis=0), 0.0)
    hi = np.maximum(w_GN.max(axis=0), 0.0)
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    scale = (hi - lo) / maxq
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    if sym:
        return scale, np.full_like(scale, (maxq + 1) // 2)
    zero = np.clip(np.round(-lo / scale), 0, maxq).astype(np.float32)
    return scale, zero


def round_to_grid(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, bits: int) -> np.ndarray:
    """Integer codes in [0, 2^bits - 1] (as float) of w on the grid (broadcasting over rows)."""
    return np.clip(np.round(w / scale) + zero, 0, 2 ** bits - 1)


def quantize_grouped(w_KN: np.ndarray, bits: int, group: int) -> dict[str, np.ndarray]:
    """RTN: {"q" [K, N] u8 codes, "scale" [K/group, N] f32, "zero" [K/group, N] u8}."""
    k, n = w_KN.shape
    if k % group:
        raise ValueError(f"K={k} is not a multiple of the group size {group}")
    w_GgN = np.asarray(w_KN, np.float32).reshape(k // group, group, n)
    scales, zeros, codes = [], [], []
    for w_gN in w_GgN:
        scale, zero = grid_params(w_gN, bits)
        codes.append(round_to_grid(w_gN, scale, zero, bits))
        scales.append(scale)
        zeros.append(zero)
    return {"q": np.concatenate(codes).astype(np.uint8), "scale": np.stack(scales),
            "zero": np.stack(zeros).astype(np.uint8)}


def dequantize_grouped(q: dict[str, np.ndarray]) -> np.ndarray:
    """(q - zero) * scale, [K, N] f32."""
    group = q["q"].shape[0] // q["scale"].shape[0]
    zero = np.repeat(q["zero"].astype(np.float32), group, axis=0)
    return ((q["q"].astype(np.float32) - zero) * np.repeat(q["scale"], group, axis=0)).astype(np.float32)


def pack_codes(q_KN: np.ndarray) -> np.ndarray:
    """[K, N] codes in [0, 15] -> [K/2, N] int8 in the int4 kernel's layout (signed q - 8)."""
    k = q_KN.shape[0]
    if k % 2:
        raise ValueError(f"K={k} must be even to pack two codes a byte")
    s = q_KN.astype(np.int32) - 8
    lo, hi = s[: k // 2], s[k // 2:]
    return ((hi << 4) | (lo & 0xF)).astype(np.uint8).view(np.int8)


def unpack_codes(packed_KN: np.ndarray) -> np.ndarray:
    """Inverse of pack_codes: [K/2, N] int8 -> [K, N] codes in [0, 15] (u8)."""
    p = packed_KN.astype(np.int32)
    lo, hi = ((p << 28) >> 28), p >> 4
    return (np.concatenate([lo, hi]) + 8).astype(np.uint8)
