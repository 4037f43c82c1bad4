"""Pallas kernels for TPU and GPU; depends on jax only. Installed as `tpustack.kernels`.

Public entry points (each with impl="auto" | "pallas" | "xla" | "reference"):
flash_attention, decode_attention, paged_attention, int8_matmul, int4_matmul,
w8a8_matmul; quantizers live in `reference`. `matmul` (impl auto | cpu | xla) is a float
matmul with a native CPU kernel for few rows. See docs/kernels.md.
"""

from .compat import KernelShapeError, poison_outputs
from .decode_attention import decode_attention, paged_attention, paged_attention_impl
from .flash_attention import flash_attention
from .matmul import matmul, matmul_impl, pack_weight, packable, packed_matmul
from .quant_matmul import int4_matmul, int8_matmul, w8a8_matmul
from .reference import quantize_int4, quantize_int8

KERNELS: tuple[str, ...] = ("flash_attention", "decode_attention", "paged_attention",
                            "int8_matmul", "int4_matmul", "w8a8_matmul")

__all__ = ["KERNELS", "KernelShapeError", "poison_outputs", "flash_attention", "decode_attention",
           "paged_attention", "paged_attention_impl", "matmul", "matmul_impl", "pack_weight", "packable",
           "packed_matmul", "int8_matmul", "int4_matmul",
           "w8a8_matmul", "quantize_int8", "quantize_int4"]
