"""Bytes per element of every dtype spelling the package reads: the one table.

Three spellings name the same types: numpy / jax names (`float32`, `bfloat16`: ModelConfig's
dtype and param_dtype), the short names of configs and flags (`fp32`, `bf16`, `int4`: weight
formats, the KV cache), and XLA's HLO names (`f32`, `s32`, `pred`: compiled modules' text).
`int4` packs two to a byte. Depends on nothing, so every layer can import it (kernels/ uses
jnp's itemsize and does not import tpustack).
"""

from __future__ import annotations

ITEMSIZE: dict[str, float] = {
    "float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "float8": 1,
    "int64": 8, "int32": 4, "uint32": 4, "int8": 1, "uint8": 1, "bool": 1, "int4": 0.5,
}
# config / CLI spellings
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "float8"}
# HLO spellings (in the order a regex over HLO text tries them)
HLO_NAMES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16", "s32": "int32", "u32": "uint32",
             "pred": "bool", "s8": "int8", "u8": "uint8", "f64": "float64", "s64": "int64"}


def itemsize(dtype: str) -> float:
    """Bytes per element of `dtype` in any of the three spellings (int4: 0.5)."""
    name = SHORT_NAMES.get(dtype) or HLO_NAMES.get(dtype) or dtype
    if name not in ITEMSIZE:
        raise KeyError(f"unknown dtype {dtype!r}; known: {', '.join([*ITEMSIZE, *SHORT_NAMES, *HLO_NAMES])}")
    return ITEMSIZE[name]
