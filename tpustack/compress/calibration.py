"""Calibration data and per-layer activations for GPTQ and AWQ.

Calibration text is the data pipeline's held-out split (the workdir's own data config),
cut into windows by the same seeded Batcher as eval, but at stream steps far past the ones
eval reads, so the windows are drawn independently of the eval batches. `linear_inputs`
runs one decoder layer on float [K, N] weights and returns what each linear sees, so a
quantizer can walk the model layer by layer on the already-quantized prefix.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.config import Config, ModelConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.model.layers import apply_rope, grouped_attention, rope_tables

CALIBRATION_STEP0 = 1_000_000  # Batcher steps from here on: eval reads steps 0..eval_batches-1
# The linears of a layer, by the activation they read: (group name, [param names]).
INPUT_GROUPS = (("attn_in", ("q", "k", "v")), ("o_in", ("o",)), ("mlp_in", ("gate", "up")), ("down_in", ("down",)))


def calibration_tokens(config: Config, num_seqs: int, seq_len: int | None = None, seed: int = 0) -> np.ndarray:
    """[num_seqs, T] int32 windows of held-out text (T = train.seq_len unless given), seeded."""
    seq_len = seq_len or config.train.seq_len
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))["heldout"]
    batcher = Batcher(tokens, num_seqs, seq_len, config.train.seed + seed, "heldout")
    return batcher.host_batch(CALIBRATION_STEP0)["inputs"]


def flat_weight(w: np.ndarray, name: str) -> np.ndarray:
    """A linear's param ([D, N, H], [N, H, D], [D, F], ...) as [K, N]."""
    contract = 2 if name == "o" else 1
    return np.asarray(w, np.float32).reshape(math.prod(w.shape[:contract]), -1)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The model's RMSNorm (f32)."""
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def linear_inputs(cfg: ModelConfig, layer: dict, x_BTD: jax.Array) -> dict[str, jax.Array]:
    """One layer (float param dict `layer_i`) on x: each linear group's input [B*T, K] and the
    layer output "out" [B, T, D]. The same math as tpustack.model.Block, in f32."""
    b, t, d = x_BTD.shape
    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.heads_dim
    attn, mlp = layer["attn"], layer["mlp"]
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), h, cfg.rope_theta)
    xn = rms_norm(x_BTD, layer["attn_norm"]["scale"], cfg.norm_eps)
    q = apply_rope((xn.reshape(-1, d) @ attn["q"].reshape(d, -1)).reshape(b, t, n, h), cos, sin)
    k = apply_rope((xn.reshape(-1, d) @ attn["k"].reshape(d, -1)).reshape(b, t, kv, h), cos, sin)
    v = (xn.reshape(-1, d) @ attn["v"].reshape(d, -1)).reshape(b, t, kv, h)
    o_in = grouped_attention(q, k, v, jnp.tril(jnp.ones((t, t), dtype=bool))[None]).reshape(b * t, n * h)
    hid = x_BTD + (o_in @ attn["o"].reshape(n * h, d)).reshape(b, t, d)
    hn = rms_norm(hid, layer["mlp_norm"]["scale"], cfg.norm_eps).reshape(-1, d)
    down_in = jax.nn.silu(hn @ mlp["gate"]) * (hn @ mlp["up"])
    out = hid + (down_in @ mlp["down"]).reshape(b, t, d)
    return {"attn_in": xn.reshape(-1, d), "o_in": o_in, "mlp_in": hn, "down_in": down_in, "out": out}


linear_inputs_jit = jax.jit(linear_inputs, static_argnums=0)


def embed(params: dict, tokens_BT: np.ndarray) -> jax.Array:
    """The decoder's input activations [B, T, D] (f32)."""
    return jnp.take(jnp.asarray(params["embedding"], jnp.float32), jnp.asarray(tokens_BT), axis=0)


def head_input(cfg: ModelConfig, params: dict, x_BTD: jax.Array) -> jax.Array:
    """The LM head's input [B*T, D]: the final norm of the last layer's output."""
    return rms_norm(x_BTD, params["final_norm"]["scale"], cfg.norm_eps).reshape(-1, cfg.d_model)


def heldout_tiles(config: Config, calib: int, seq_len: int | None = None, seed: int = 0) -> np.ndarray:
    """[W, T + 1] int32: the whole held-out stream cut into back-to-back windows, less every window
    that overlaps one of the `calib` calibration windows (calibration_tokens with the same seed), so
    a quality table can evaluate every row on the most held-out text the calibration did not see."""
    seq_len = seq_len or config.train.seq_len
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))["heldout"]
    starts = Batcher(tokens, calib, seq_len, config.train.seed + seed, "heldout").offsets(CALIBRATION_STEP0)
    edges = np.zeros(len(tokens) + 1, np.int32)
    np.add.at(edges, starts, 1)
    np.add.at(edges, starts + seq_len + 1, -1)
    seen = np.cumsum(edges)[: len(tokens)] > 0
    n = len(tokens) // (seq_len + 1)
    keep = [i for i in range(n) if not seen[i * (seq_len + 1): (i + 1) * (seq_len + 1)].any()]
    return np.stack([np.asarray(tokens[i * (seq_len + 1): (i + 1) * (seq_len + 1)], np.int32) for i in keep])
