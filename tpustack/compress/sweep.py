"""Calibration for pruning: seeded held-out token windows, and a layer-by-layer sweep that
hands each block's linear-layer inputs to a pruner and feeds the pruned block's output on.

As in SparseGPT and Wanda, each block sees the output of the already-pruned blocks before
it; within a block every linear's input is taken from the dense block (one pass per block).

Dimension letters: B batch, T sequence, M = B*T rows, D model, F mlp, N heads, K kv heads,
H head dim, I a linear's input width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.config import Config, ModelConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.model.layers import RMSNorm, apply_rope, dense, grouped_attention, rope_tables

# The linears pruned in every block: (module, name) -> how many leading dims are inputs.
LINEARS = {("attn", "q"): 1, ("attn", "k"): 1, ("attn", "v"): 1, ("attn", "o"): 2,
           ("mlp", "gate"): 1, ("mlp", "up"): 1, ("mlp", "down"): 1}

# Calibration windows come from the held-out split under a seed of their own, so they are not
# the windows the held-out loss is measured on (those use train.seed).
CALIB_SEED_OFFSET = 1_000_003


def calibration_tokens(config: Config, num_seqs: int, seq_len: int, seed: int | None = None) -> np.ndarray:
    """[num_seqs, seq_len] held-out token windows of the config's data, seeded."""
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))["heldout"]
    seed = config.train.seed + CALIB_SEED_OFFSET if seed is None else seed
    return Batcher(tokens, num_seqs, seq_len, seed, "heldout").host_batch(0)["inputs"]


def _norm(cfg: ModelConfig, scale_D: jax.Array, x_BTD: jax.Array) -> jax.Array:
    return RMSNorm(cfg).apply({"params": {"scale": scale_D}}, x_BTD)


def block_inputs(cfg: ModelConfig, layer: dict, x_BTD: jax.Array, cos_BTH: jax.Array,
                 sin_BTH: jax.Array) -> tuple[dict, jax.Array]:
    """({(module, name): input [M, I] of that linear}, block output [B, T, D]) of one block.

    Head counts come from the params, not cfg, so a block pruned to fewer heads runs too."""
    attn, mlp = layer["attn"], layer["mlp"]
    a_BTD = _norm(cfg, layer["attn_norm"]["scale"], x_BTD)
    q_BTNH = apply_rope(dense(a_BTD, attn["q"]), cos_BTH, sin_BTH)
    k_BTKH = apply_rope(dense(a_BTD, attn["k"]), cos_BTH, sin_BTH)
    v_BTKH = dense(a_BTD, attn["v"])
    t = x_BTD.shape[1]
    o_BTNH = grouped_attention(q_BTNH, k_BTKH, v_BTKH, jnp.tril(jnp.ones((t, t), dtype=bool))[None])
    h_BTD = x_BTD + dense(o_BTNH, attn["o"], contract=2)
    m_BTD = _norm(cfg, layer["mlp_norm"]["scale"], h_BTD)
    down_BTF = jax.nn.silu(dense(m_BTD, mlp["gate"])) * dense(m_BTD, mlp["up"])
    out_BTD = h_BTD + dense(down_BTF, mlp["down"])
    rows = lambda x: x.reshape(-1, int(np.prod(x.shape[2:])))  # noqa: E731
    a, m = rows(a_BTD), rows(m_BTD)
    inputs = {("attn", "q"): a, ("attn", "k"): a, ("attn", "v"): a, ("attn", "o"): rows(o_BTNH),
              ("mlp", "gate"): m, ("mlp", "up"): m, ("mlp", "down"): rows(down_BTF)}
    return inputs, out_BTD


_block_inputs = jax.jit(block_inputs, static_argnums=0)


def sweep(cfg: ModelConfig, params: dict, tokens_BT: np.ndarray,
          prune_block: Callable[[int, dict, dict], dict], progress: Callable[[int], None] | None = None) -> dict:
    """Params with every block replaced by prune_block(i, block params, {linear: X [M, I]}),
    block i's inputs computed through the already-pruned blocks before it (f32 throughout)."""
    cfg = dataclasses.replace(cfg, dtype="float32")
    params = dict(params)
    tokens_BT = jnp.asarray(tokens_BT)
    x_BTD = jnp.take(jnp.asarray(params["embedding"], jnp.float32), tokens_BT, axis=0)
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    cos_BTH, sin_BTH = rope_tables(positions_BT, cfg.heads_dim, cfg.rope_theta)
    for i in range(cfg.num_layers):
        layer = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params[f"layer_{i}"])
        inputs, _ = _block_inputs(cfg, layer, x_BTD, cos_BTH, sin_BTH)
        pruned = jax.tree.map(np.asarray, prune_block(i, layer, inputs))
        params[f"layer_{i}"] = pruned
        _, x_BTD = _block_inputs(cfg, pruned, x_BTD, cos_BTH, sin_BTH)
        if progress is not None:
            progress(i)
    return params


def linear_matrix(w: Any, module_name: tuple[str, str]) -> np.ndarray:
    """A linear's weight as a 2-D [I, O] numpy array (its leading input dims flattened)."""
    w = np.asarray(w, np.float32)
    n_in = LINEARS[module_name]
    return w.reshape(int(np.prod(w.shape[:n_in])), -1)
