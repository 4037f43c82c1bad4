"""Layers of a Llama decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Dimension letters: B batch, T query length, S key length, D model, F mlp, N heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, V vocab.
Parameters are stored in `param_dtype` (the fp32 master copy when training) and cast to
the compute `dtype` where they are used, so gradients land in the master dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from tpustack.config import ModelConfig


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def param(module: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str, ...],
          cfg: ModelConfig, std: float | None = None, ones: bool = False) -> jax.Array:
    """Create a parameter carrying its logical axis names; return it in the compute dtype."""
    init = nn.initializers.ones if ones else nn.initializers.normal(cfg.init_std if std is None else std)
    value = module.param(name, nn.with_logical_partitioning(init, names), shape,
                         dtype_of(cfg.param_dtype))
    return value.astype(dtype_of(cfg.dtype))


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        scale_D = param(self, "scale", (x_BTD.shape[-1],), ("norm",), self.cfg, ones=True)
        x32 = x_BTD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        # Hugging Face multiplies in the input dtype after normalising in f32.
        return x32.astype(x_BTD.dtype) * scale_D


def rope_tables(positions_BT: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [B, T, H] in the Hugging Face rotate-half layout."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq
    emb_BTH = jnp.concatenate([freqs_BTh, freqs_BTh], axis=-1)
    return jnp.cos(emb_BTH), jnp.sin(emb_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    half = x_BTNH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BTNH[..., half:], x_BTNH[..., :half]], axis=-1)
    cos, sin = cos_BTH[:, :, None, :], sin_BTH[:, :, None, :]
    out = x_BTNH.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_BTNH.dtype)


def grouped_attention(q_BTNH: jax.Array, k_BSKH: jax.Array, v_BSKH: jax.Array,
                      mask_BTS: jax.Array | None) -> jax.Array:
    """Softmax attention with K kv heads shared by N query heads, without repeating K/V."""
    b, t, n, h = q_BTNH.shape
    k_heads = k_BSKH.shape[2]
    q_BTKGH = q_BTNH.reshape(b, t, k_heads, n // k_heads, h) * (1.0 / math.sqrt(h))
    scores_BKGTS = jnp.einsum("btkgh,bskh->bkgts", q_BTKGH, k_BSKH,
                              preferred_element_type=jnp.float32)
    if mask_BTS is not None:
        scores_BKGTS = jnp.where(mask_BTS[:, None, None], scores_BKGTS, jnp.finfo(jnp.float32).min)
    probs_BKGTS = jax.nn.softmax(scores_BKGTS, axis=-1).astype(v_BSKH.dtype)
    out_BTKGH = jnp.einsum("bkgts,bskh->btkgh", probs_BKGTS, v_BSKH)
    return out_BTKGH.reshape(b, t, n, h)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array,
                 positions_BT: jax.Array | None = None, cache=None):
        """Training: causal self-attention. With a LayerCache (decoding): write this step's
        keys/values at `positions_BT`, attend over the cache, return (out, new cache)."""
        cfg = self.cfg
        d, n, k, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.heads_dim
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers)
        wq_DNH = param(self, "q", (d, n, h), ("embed", "heads", "head_dim"), cfg)
        wk_DKH = param(self, "k", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        wv_DKH = param(self, "v", (d, k, h), ("embed", "kv_heads", "head_dim"), cfg)
        wo_NHD = param(self, "o", (n, h, d), ("heads", "head_dim", "embed"), cfg, std=out_std)
        q_BTNH = apply_rope(jnp.einsum("btd,dnh->btnh", x_BTD, wq_DNH), cos_BTH, sin_BTH)
        k_BTKH = apply_rope(jnp.einsum("btd,dkh->btkh", x_BTD, wk_DKH), cos_BTH, sin_BTH)
        v_BTKH = jnp.einsum("btd,dkh->btkh", x_BTD, wv_DKH)
        q_BTNH = nn.with_logical_constraint(q_BTNH, ("batch", "length", "act_heads", None))
        if cache is not None:
            cache = cache.write(k_BTKH, v_BTKH, positions_BT)
            k_BSKH, v_BSKH = cache.read(q_BTNH.dtype)
            # a query sees every cached key at or before its own position; later slots
            # hold stale entries (padding, rejected drafts) and are masked
            mask_BTS = jnp.arange(k_BSKH.shape[1])[None, None, :] <= positions_BT[:, :, None]
            out_BTNH = grouped_attention(q_BTNH, k_BSKH, v_BSKH, mask_BTS)
            return jnp.einsum("btnh,nhd->btd", out_BTNH, wo_NHD), cache
        if cfg.attention_impl == "cudnn":
            out_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True,
                                                    implementation="cudnn")
        else:
            t = x_BTD.shape[1]
            causal_TS = jnp.tril(jnp.ones((t, t), dtype=bool))
            out_BTNH = grouped_attention(q_BTNH, k_BTKH, v_BTKH, causal_TS[None])
        return jnp.einsum("btnh,nhd->btd", out_BTNH, wo_NHD)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        d, f = cfg.d_model, cfg.ffn_dim
        w_gate_DF = param(self, "gate", (d, f), ("embed", "mlp"), cfg)
        w_up_DF = param(self, "up", (d, f), ("embed", "mlp"), cfg)
        w_down_FD = param(self, "down", (f, d), ("mlp", "embed"), cfg,
                          std=cfg.init_std / math.sqrt(2 * cfg.num_layers))
        gate_BTF = jnp.einsum("btd,df->btf", x_BTD, w_gate_DF)
        up_BTF = jnp.einsum("btd,df->btf", x_BTD, w_up_DF)
        h_BTF = nn.with_logical_constraint(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "length", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h_BTF, w_down_FD)
