"""Remat policies: the named policy over the projections (tpustack.remat) saves what it names,
leaves the gradients unchanged, and the memory estimate and step-time prediction count it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from helpers import tiny_config
from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.model import Decoder
from tpustack.model.layers import rope_tables
from tpustack.model.transformer import block_class
from tpustack.plan import steptime
from tpustack.plan.activations import saved_dots
from tpustack.plan.memory import train_memory
from tpustack.remat import is_policy

# distinct widths, so a residual's shape says which projection it is
CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=176,
                  max_seq_len=32, scan_layers=True)
B, T = 2, 16


def residual_shapes(remat: str) -> list[tuple[int, ...]]:
    """Shapes of what one block saves for its backward pass under `remat`."""
    cfg = dataclasses.replace(CFG, remat_policy=remat)
    block = block_class(cfg)(cfg)
    x_BTD = jax.random.normal(jax.random.key(1), (B, T, cfg.d_model))
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), cfg.heads_dim, cfg.rope_theta)
    params = meta.unbox(block.init(jax.random.key(0), x_BTD, cos, sin))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the public API prints them: "bf16[2,16,4,16] from ..."
        jax.ad_checkpoint.print_saved_residuals(lambda p, x: block.apply(p, x, cos, sin).sum(), params, x_BTD)
    return [tuple(int(n) for n in dims.split(",") if n) for dims in re.findall(r"^\w+\[([\d,]*)\]", out.getvalue(), re.M)]


def test_named_policy_saves_q_k_v_o_and_reruns_gate_up():
    h = CFG.heads_dim
    q, kv, ffn, out = (B, T, CFG.num_heads, h), (B, T, CFG.num_kv_heads, h), (B, T, CFG.ffn_dim), (B, T, CFG.d_model)
    named = residual_shapes("save_dots_except_mlp_in")
    assert ffn not in named  # gate and up rerun
    assert named.count(kv) == 2 and q in named  # q, k, v kept
    # the block's input and o's output; down's output only feeds the residual sum, so no
    # backward op reads it (the next layer's saved input holds it)
    assert named.count(out) == 2
    dots = residual_shapes("dots_with_no_batch_dims_saveable")
    assert dots.count((B * T, CFG.ffn_dim)) == 2  # the dots policy keeps gate and up (as the 2-D dots)
    qkv = residual_shapes("save_qkv_proj")  # MaxText's `custom` recipes' set, in HBM
    assert q in qkv and qkv.count(kv) == 2 and qkv.count(out) == 1 and ffn not in qkv
    nothing = residual_shapes("nothing_saveable")
    assert q not in nothing and kv not in nothing and ffn not in nothing


def test_named_policy_keeps_the_gradients():
    cfg = tiny_config(model__remat_policy="none", model__scan_layers="True").model
    tokens = jax.random.randint(jax.random.key(2), (2, 16), 0, cfg.vocab_size)
    params = meta.unbox(Decoder(cfg).init(jax.random.key(0), tokens)["params"])

    def grads(remat):
        model = Decoder(dataclasses.replace(cfg, remat_policy=remat))
        return jax.grad(lambda p: jnp.mean(model.apply({"params": p}, tokens) ** 2))(params)

    ref = grads("none")
    for remat in ("save_dots_except_mlp_in", "nothing_saveable"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6),
                     grads(remat), ref)


def test_plan_counts_the_named_policy():
    cfg = tiny_config(model__d_model="1024", model__num_heads="8", model__num_kv_heads="2",
                      model__ffn_dim="3584", model__num_layers="8").model
    names = [n for n, _, _ in saved_dots(cfg, "bfloat16", 2, 512, "save_dots_except_mlp_in", backend="tpu")]
    assert names == ["q proj", "k proj", "v proj", "o proj"]
    mesh = {"data": 1, "stage": 1, "fsdp": 8, "tensor": 1}
    total = {r: train_memory(cfg, "bf16", mesh, 3, 16, 2048, r, backend="tpu").total
             for r in ("nothing_saveable", "save_dots_except_mlp_in", "dots_with_no_batch_dims_saveable")}
    assert total["nothing_saveable"] < total["save_dots_except_mlp_in"] < total["dots_with_no_batch_dims_saveable"]
    # it reruns gate and up: 2 d F of the layer's 2 d (N H + 2 K H) + 2 N H d + 3 (2 d F) FLOPs a token
    d, f, q, kv = 1024, 3584, 8 * 128, 2 * 128
    share = 4 * d * f / (2 * d * (q + 2 * kv) + 2 * q * d + 6 * d * f)
    assert steptime.remat_recompute("save_dots_except_mlp_in", cfg) == pytest.approx(0.15 + share)
    assert steptime.remat_recompute("dots_with_no_batch_dims_saveable", cfg) < steptime.remat_recompute(
        "save_dots_except_mlp_in", cfg) < steptime.remat_recompute("nothing_saveable", cfg)


def test_config_takes_the_named_policy():
    assert tiny_config(model__remat_policy="save_dots_except_mlp_in").model.remat_policy == "save_dots_except_mlp_in"
    assert is_policy("nothing_saveable") and is_policy("everything_saveable") and is_policy("checkpoint_dots")
    # a factory of policies is no policy: it would fail at trace time, so the config refuses it
    with pytest.raises(UserError, match="model.remat_policy: 'save_only_these_names' is not"):
        tiny_config(model__remat_policy="save_only_these_names")
