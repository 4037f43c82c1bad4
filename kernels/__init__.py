"""Pallas kernels for TPU and GPU; depends on jax only. Installed as `tpustack.kernels`.

The kernels themselves (flash attention, decode / paged attention, quantized matmul)
arrive with their own issue; until then the model uses XLA's implementations.
"""

KERNELS: tuple[str, ...] = ()
