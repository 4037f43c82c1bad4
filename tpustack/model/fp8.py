"""fp8 matmuls with per-tensor delayed scaling (train.precision=fp8), emulated exactly on CPU.

Each linear's input and weight are quantized to float8_e4m3fn and the gradient flowing into
it to float8_e5m2, each with a per-tensor scale. The matmuls take the fp8 operands themselves
(dot_general of float8 arrays accumulated in f32, then divided by the two scales): the
compiled TPU program keeps them as fp8 dots (v5p, v6e), GPU's GEMM rewriter maps them to fp8
GEMMs, and on CPU jax computes the same products exactly (emulation). Delayed scaling: the scale a step uses comes from the
amax history of earlier steps, scale = FP8_MAX / max(history) (1 while the history is
empty); the step's own amax is pushed into the history afterwards. A value beyond the range
the history predicts saturates at +-FP8_MAX.

State: per linear, a float32 history [3, AMAX_HISTORY] (rows: input, weight, gradient) in
the flax collection "fp8", at the same path as the linear's weight. The fp32 master weights
are untouched. The new histories leave the custom VJP as the "gradient" of the history
input (flax's overwrite-with-gradient trick): the train step takes d loss / d history as the
next state, never as a gradient to apply. A model applied without the collection (eval,
decode, export) runs its plain matmuls in the compute dtype.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

E4M3 = jnp.float8_e4m3fn  # forward: inputs and weights (more mantissa)
E5M2 = jnp.float8_e5m2  # backward: gradients (more range)
AMAX_HISTORY = 16
COLLECTION = "fp8"
ROW_X, ROW_W, ROW_G = 0, 1, 2


def fp8_max(dtype) -> float:
    return float(jnp.finfo(dtype).max)


def scale_from_history(history_L: jax.Array, dtype) -> jax.Array:
    """FP8_MAX / max(history): the largest amax seen recently lands on the format's largest value."""
    amax = jnp.max(history_L)
    return jnp.where(amax > 0.0, fp8_max(dtype) / jnp.maximum(amax, 1e-30), 1.0).astype(jnp.float32)


def push_amax(history_L: jax.Array, x: jax.Array) -> jax.Array:
    """The history with max|x| in front and the oldest entry dropped."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.concatenate([amax[None], history_L[:-1]])


def quantize(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """x * scale saturated to the format's range, rounded to fp8 (round to nearest even)."""
    m = fp8_max(dtype)
    return jnp.clip(x.astype(jnp.float32) * scale, -m, m).astype(dtype)


def qdq(x: jax.Array, dtype, scale: jax.Array) -> jax.Array:
    """x rounded through fp8 at `scale` and back, in x's dtype."""
    return (quantize(x, dtype, scale).astype(jnp.float32) / scale).astype(x.dtype)


@jax.custom_vjp
def fp8_matmul(x_MK: jax.Array, w_KN: jax.Array, history_3L: jax.Array) -> jax.Array:
    """x @ w with e4m3 operands at delayed scales; the gradient into it goes through e5m2."""
    return _fp8_matmul_fwd(x_MK, w_KN, history_3L)[0]


def scaled_dot(a_MK: jax.Array, b_KN: jax.Array, scale_a: jax.Array, scale_b: jax.Array, dtype) -> jax.Array:
    """(a @ b) / (scale_a * scale_b) of two fp8 operands, accumulated in f32 (fp8 products are
    exact in f32: this is the dot of the dequantized values up to summation order)."""
    y = jax.lax.dot_general(a_MK, b_KN, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return (y / (scale_a * scale_b)).astype(dtype)


def _fp8_matmul_fwd(x_MK, w_KN, history_3L):
    sx, sw = scale_from_history(history_3L[ROW_X], E4M3), scale_from_history(history_3L[ROW_W], E4M3)
    xq_MK, wq_KN = quantize(x_MK, E4M3, sx), quantize(w_KN, E4M3, sw)
    y_MN = scaled_dot(xq_MK, wq_KN, sx, sw, x_MK.dtype)
    new_3L = history_3L.at[ROW_X].set(push_amax(history_3L[ROW_X], x_MK))
    new_3L = new_3L.at[ROW_W].set(push_amax(history_3L[ROW_W], w_KN))
    # fp8 residuals (a quarter of f32's bytes); the empty arrays only carry the input dtypes
    dtypes = (jnp.zeros((0,), x_MK.dtype), jnp.zeros((0,), w_KN.dtype))
    return y_MN, (xq_MK, wq_KN, sx, sw, new_3L, dtypes)


def _fp8_matmul_bwd(res, g_MN):
    xq_MK, wq_KN, sx, sw, new_3L, (x_like, w_like) = res
    sg = scale_from_history(new_3L[ROW_G], E5M2)
    gq_MN = quantize(g_MN, E5M2, sg)
    dx_MK = scaled_dot(gq_MN, wq_KN.T, sg, sw, x_like.dtype)
    dw_KN = scaled_dot(xq_MK.T, gq_MN, sx, sg, w_like.dtype)
    # the "gradient" of the history is the next history (overwrite-with-gradient)
    return dx_MK, dw_KN, new_3L.at[ROW_G].set(push_amax(new_3L[ROW_G], g_MN))


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def fp8_dense(module: nn.Module, name: str, x: jax.Array, w: jax.Array, contract: int) -> jax.Array:
    """layers.dense through fp8_matmul, with `name`'s amax history from the fp8 collection."""
    history_3L = module.get_variable(COLLECTION, name)
    in_shape, out_shape = w.shape[:contract], w.shape[contract:]
    lead = x.shape[: x.ndim - contract]
    y = fp8_matmul(x.reshape(math.prod(lead), math.prod(in_shape)),
                   w.reshape(math.prod(in_shape), math.prod(out_shape)), history_3L)
    return y.reshape(*lead, *out_shape)


LINEAR_NAMES = ("q", "k", "v", "o", "gate", "up", "down", "lm_head")


def init_fp8_state(params: Any) -> dict:
    """Empty amax histories [..., 3, AMAX_HISTORY] beside every linear weight of a (possibly
    abstract, possibly scanned) param tree: leading layer axes are kept."""
    def walk(node: Any, stacked: tuple[int, ...]) -> dict:
        out = {}
        for key, child in node.items():
            if isinstance(child, dict):
                sub = walk(child, stacked + ((child_layers(child),) if key == "layers" else ()))
                if sub:
                    out[key] = sub
            elif key in LINEAR_NAMES:
                out[key] = jnp.zeros((*stacked, 3, AMAX_HISTORY), jnp.float32)
        return out

    def child_layers(layers: dict) -> int:
        return jax.tree.leaves(layers)[0].shape[0]

    return walk(nn.meta.unbox(params), ())
