"""Weight-only quantized linear layers (int8 per output channel, int4 group-wise) for serving.

`model.weight_quant = "int8" | "int4"` swaps every matmul weight of the decoder (q, k, v,
o, gate, up, down, lm_head) for its quantized form, stored flat as [K_in, N_out]:
  int8: `<name>_int8` [K, N] int8 and `<name>_scale` [N] f32
  int4: `<name>_int4` [K/2, N] int8 (two values a byte) and `<name>_scale` [K/128, N] f32
and runs it through tpustack.kernels' quantized matmuls (dequantized inside the kernel,
so the weights are never expanded in memory). `quantize_params` converts a trained float
tree; the embedding and norms stay in float.

  nf4: QLoRA's NormalFloat-4 with double quantization (tpustack.model.nf4) of the
  [N, K] (torch-layout) weight, bit-equal to bitsandbytes' quantize_4bit: `<name>_nf4_codes`
  [KN/2] u8, `<name>_nf4_absmax_codes` [KN/64] u8, `<name>_nf4_absmax_scale` [KN/16384] f32,
  `<name>_nf4_absmax_offset` [1] f32. No kernel takes NF4: it is dequantized on the fly
  (inside jit, per matmul) and multiplied in x's dtype; gradients flow to x only.
  int4_zp: group-wise asymmetric 3/4-bit (RTN, GPTQ, AWQ; tpustack.compress): `<name>_codes`
  [K/2, N] int8 in the int4 kernel's packed layout holding q - 8 (q in [0, 2^bits - 1]),
  `<name>_scale` [K/g, N] f32, `<name>_zero` [K/g, N] u8, g = model.weight_group;
  w = (q - zero) * scale. With g = 128 and K % 256 == 0 it runs on int4_matmul plus a
  [M, K/g] @ [K/g, N] zero-point correction; other shapes are dequantized by XLA.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from tpustack.model.nf4 import dequantize_nf4, nf4_shapes, quantize_nf4
from tpustack.kernels import int4_matmul, int8_matmul, quantize_int4, quantize_int8

WEIGHT_QUANT = ("none", "int8", "int4", "nf4", "int4_zp")
_MATMUL_WEIGHTS = {"q", "k", "v", "o", "gate", "up", "down", "lm_head"}


def quantized_dense(module: nn.Module, name: str, x: jax.Array, in_shape: tuple[int, ...],
                    out_shape: tuple[int, ...], names: tuple[str | None, str | None], cfg) -> jax.Array:
    """x [..., *in] @ W [*in, *out] with W quantized; `names` are the flat [K, N] logical axes."""
    k, n = math.prod(in_shape), math.prod(out_shape)
    zeros = nn.initializers.zeros
    lead = x.shape[: x.ndim - len(in_shape)]
    if cfg.weight_quant == "nf4":
        w_KN = nf4_weight(module, name, k, n)
        y = x.reshape(-1, k) @ jax.lax.stop_gradient(w_KN).astype(x.dtype)
        return y.reshape(*lead, *out_shape).astype(x.dtype)
    if cfg.weight_quant == "int4_zp":
        return zero_point_matmul(module, name, x.reshape(-1, k), k, n, names, cfg).reshape(*lead, *out_shape)
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
    y = matmul(x.reshape(-1, k), w, scale, impl=cfg.matmul_impl)
    return y.reshape(*lead, *out_shape).astype(x.dtype)


def zero_point_matmul(module: nn.Module, name: str, x_MK: jax.Array, k: int, n: int,
                      names: tuple[str | None, str | None], cfg) -> jax.Array:
    """x @ ((q - zero) * scale) for the int4_zp params of one [K, N] linear."""
    g = cfg.weight_group
    codes = module.param(f"{name}_codes", nn.with_logical_partitioning(nn.initializers.zeros, names),
                         (k // 2, n), jnp.int8)
    scale_GN = module.param(f"{name}_scale", nn.with_logical_partitioning(nn.initializers.ones, (None, names[1])),
                            (k // g, n), jnp.float32)
    zero_GN = module.param(f"{name}_zero", nn.with_logical_partitioning(nn.initializers.zeros, (None, names[1])),
                           (k // g, n), jnp.uint8)
    offset_GN = (8.0 - zero_GN.astype(jnp.float32)) * scale_GN  # w = (q-8)*scale + (8-zero)*scale
    if g == 128 and k % 256 == 0:
        y = int4_matmul(x_MK, codes, scale_GN, impl=cfg.matmul_impl)
        xsum_MG = x_MK.astype(jnp.float32).reshape(-1, k // g, g).sum(axis=-1)
        return (y.astype(jnp.float32) + xsum_MG @ offset_GN).astype(x_MK.dtype)
    p = codes.astype(jnp.int32)
    signed_KN = jnp.concatenate([(p << 28) >> 28, p >> 4], axis=0).astype(jnp.float32)
    w_KN = signed_KN * jnp.repeat(scale_GN, g, axis=0) + jnp.repeat(offset_GN, g, axis=0)
    return (x_MK @ w_KN.astype(x_MK.dtype)).astype(x_MK.dtype)


def nf4_weight(module: nn.Module, name: str, k: int, n: int) -> jax.Array:
    """The NF4 params of one [K, N] linear (stored as bitsandbytes stores the [N, K] weight), dequantized."""
    init = {"codes": nn.initializers.zeros, "absmax_codes": nn.initializers.zeros,
            "absmax_scale": nn.initializers.ones, "absmax_offset": nn.initializers.zeros}
    dtypes = {"codes": jnp.uint8, "absmax_codes": jnp.uint8, "absmax_scale": jnp.float32,
              "absmax_offset": jnp.float32}
    q = {key: module.param(f"{name}_nf4_{key}", nn.with_logical_partitioning(init[key], (None,)), shape, dtypes[key])
         for key, shape in nf4_shapes(k * n).items()}
    return dequantize_nf4(q, (n, k)).T


def quantize_params(params: dict, mode: str) -> dict:
    """A float param tree (unrolled layers) -> the tree a `weight_quant=mode` Decoder expects."""
    if mode not in ("int8", "int4", "nf4"):
        raise ValueError(f"weight_quant {mode!r} is not int8, int4 or nf4")

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
            if mode == "nf4":
                q = quantize_nf4(np.asarray(w_KN).T)  # the [N, K] layout bitsandbytes quantizes
                out.update({f"{key}_nf4_{part}": jnp.asarray(a) for part, a in q.items()})
            elif mode == "int8":
                out[f"{key}_int8"], out[f"{key}_scale"] = quantize_int8(w_KN)
            else:
                out[f"{key}_int4"], out[f"{key}_scale"] = quantize_int4(w_KN)
        return out

    return convert(jax.device_get(params))


def weight_bytes(params: dict) -> int:
    """Bytes of every array in a (possibly quantized) param tree."""
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(params)))
