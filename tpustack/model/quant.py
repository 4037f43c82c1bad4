"""Weight-only quantized linear layers (int8 per output channel, int4 group-wise) for serving.

`model.weight_quant = "int8" | "int4"` swaps every matmul weight of the decoder (q, k, v,
o, gate, up, down, lm_head) for its quantized form, stored flat as [K_in, N_out]:
  int8: `<name>_int8` [K, N] int8 and `<name>_scale` [N] f32
  int4: `<name>_int4` [K/2, N] int8 (two values a byte) and `<name>_scale` [K/128, N] f32
and runs it through tpustack.kernels' quantized matmuls (dequantized inside the kernel,
so the weights are never expanded in memory). `quantize_params` converts a trained float
tree; the embedding and norms stay in float.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tpustack.kernels import int4_matmul, int8_matmul, quantize_int4, quantize_int8

WEIGHT_QUANT = ("none", "int8", "int4")
_MATMUL_WEIGHTS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def quantized_dense(module: nn.Module, name: str, x: jax.Array, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...], names: tuple[str | None, str | None], cfg) -> jax.Array:
    """x [..., *in] @ W [*in, *out] with W quantized; `names` are the flat [K, N] logical axes."""
    k, n = math.prod(in_shape), math.prod(out_shape)
    zeros = nn.initializers.zeros
    if cfg.weight_quant == "int8":
        w = module.param(f"{name}_int8", nn.with_logical_partitioning(zeros, names), (k, n), jnp.int8)
        scale = module.param(f"{name}_scale", nn.with_logical_partitioning(nn.initializers.ones, names[1:]),
                             (n,), jnp.float32)
        matmul = int8_matmul
    else:
        w = module.param(f"{name}_int4", nn.with_logical_partitioning(zeros, names), (k // 2, n), jnp.int8)
        scale = module.param(f"{name}_scale", nn.with_logical_partitioning(nn.initializers.ones, (None, names[1])),
                             (k // 128, n), jnp.float32)
        matmul = int4_matmul
    lead = x.shape[: x.ndim - len(in_shape)]
    y = matmul(x.reshape(-1, k), w, scale, impl=cfg.matmul_impl)
    return y.reshape(*lead, *out_shape).astype(x.dtype)


def quantize_params(params: dict, mode: str) -> dict:
    """A float param tree (unrolled layers) -> the tree a `weight_quant=mode` Decoder expects."""
    if mode not in ("int8", "int4"):
        raise ValueError(f"weight_quant {mode!r} is not int8 or int4")

    def convert(tree: dict) -> dict:
        out = {}
        for key, value in tree.items():
            if isinstance(value, dict):
                out[key] = convert(value)
                continue
            if key not in _MATMUL_WEIGHTS:
                out[key] = value
                continue
            w = jnp.asarray(value, jnp.float32)
            contract = 2 if key == "o" else 1  # o is [N, H, D]: (N, H) are the input dims
            w_KN = w.reshape(math.prod(w.shape[:contract]), -1)
            if mode == "int8":
                out[f"{key}_int8"], out[f"{key}_scale"] = quantize_int8(w_KN)
            else:
                out[f"{key}_int4"], out[f"{key}_scale"] = quantize_int4(w_KN)
        return out

    return convert(jax.device_get(params))


def weight_bytes(params: dict) -> int:
    """Bytes of every array in a (possibly quantized) param tree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))
