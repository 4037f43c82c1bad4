"""Pruning: exact N:M and unstructured masks, the packed 2:4 format, Wanda / SparseGPT against
magnitude on a layer with outlier inputs, structured pruning against a masked computation of
the original, and `tpustack prune` end to end (written, loaded back, recovered)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from tpustack.cli import main
from tpustack.compress import pruned, structured
from tpustack.compress.prune import (METHODS, apply_masks, pack_2to4, packed_bytes, prune_matrix, prune_model,
                                     unpack_2to4)
from tpustack.compress.sweep import block_inputs
from tpustack.model import Decoder
from tpustack.model.layers import rope_tables
from tpustack.model.transformer import Block
from tpustack.weights import init_weights, load_weights


def _outlier_layer(i=256, o=96, m=1024, seed=0):
    """Calibration inputs with a few outlier channels (as LLM activations have) and a weight."""
    rng = np.random.default_rng(seed)
    x_MI = rng.normal(size=(m, i)).astype(np.float32)
    x_MI[:, rng.choice(i, 6, replace=False)] *= 25.0
    x_MI = x_MI @ (np.eye(i) + 0.3 * rng.normal(size=(i, i)) / np.sqrt(i)).astype(np.float32)  # correlated
    return x_MI, rng.normal(size=(i, o)).astype(np.float32)


@pytest.mark.parametrize("method", METHODS)
def test_two_of_four_and_exact_sparsity(method):
    x_MI, w_IO = _outlier_layer()
    p, keep = prune_matrix(method, w_IO, x_MI, None, (2, 4))
    assert np.all(np.count_nonzero(p.reshape(-1, 4, p.shape[1]), axis=1) == 2)  # exactly 2 in every group of 4
    assert np.array_equal(p != 0, keep)
    for sparsity in (0.5, 0.25):
        p, keep = prune_matrix(method, w_IO, x_MI, sparsity, None)
        assert np.count_nonzero(p == 0) == round(sparsity * p.size)
        if method != "sparsegpt":  # sparsegpt also updates the kept weights
            np.testing.assert_array_equal(p[keep], w_IO[keep])


@pytest.mark.parametrize("pattern, sparsity", [((2, 4), None), (None, 0.5)])
def test_wanda_and_sparsegpt_beat_magnitude_with_outlier_inputs(pattern, sparsity):
    x_MI, w_IO = _outlier_layer()
    err = {}
    for method in METHODS:
        p, _ = prune_matrix(method, w_IO, x_MI, sparsity, pattern)
        err[method] = np.linalg.norm(x_MI @ (p - w_IO)) / np.linalg.norm(x_MI @ w_IO)
    assert err["wanda"] < 0.5 * err["magnitude"], err
    assert err["sparsegpt"] < err["wanda"], err  # the OBS update helps on correlated inputs


def test_packed_two_of_four_round_trip():
    _, w_IO = _outlier_layer(i=64, o=24)
    p, _ = prune_matrix("magnitude", w_IO, None, None, (2, 4))
    packed = pack_2to4(p)
    assert packed["values"].shape == (32, 24) and packed["index"].dtype == np.uint8
    np.testing.assert_array_equal(unpack_2to4(packed), p)
    assert packed_bytes(packed) == p.size // 2 * 4 + p.size // 2 // 4  # f32 values + 2 bits per value
    q = p.copy()
    q[:4, 0] = 0.0  # a group with fewer than 2 nonzeros still round-trips
    np.testing.assert_array_equal(unpack_2to4(pack_2to4(q)), q)


def _tiny(**overrides):
    config = tiny_config(**overrides)
    cfg = dataclasses.replace(config.model, init_std=0.2)  # larger weights: heads and channels differ
    return dataclasses.replace(config, model=cfg), init_weights(cfg, seed=1).params


def test_block_inputs_match_the_model():
    config, params = _tiny()
    cfg = config.model
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 12)))
    x_BTD = jnp.take(params["embedding"], tokens, axis=0)
    cos, sin = rope_tables(jnp.broadcast_to(jnp.arange(12), tokens.shape), cfg.heads_dim, cfg.rope_theta)
    inputs, out = block_inputs(cfg, params["layer_0"], x_BTD, cos, sin)
    ref = Block(cfg).apply({"params": params["layer_0"]}, x_BTD, cos, sin)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert inputs[("attn", "o")].shape == (24, cfg.num_heads * cfg.heads_dim)


def _masked_reference(cfg, params, kept):
    """The original model with the removed heads' W_o rows and channels' W_down rows zeroed."""
    out = jax.tree.map(np.array, params)
    for i, keep in enumerate(kept):
        attn, mlp = out[f"layer_{i}"]["attn"], out[f"layer_{i}"]["mlp"]
        attn["o"][np.setdiff1d(np.arange(cfg.num_heads), keep["heads"])] = 0.0
        mlp["down"][np.setdiff1d(np.arange(cfg.ffn_dim), keep["ffn"])] = 0.0
    return out


@pytest.mark.parametrize("heads, kv_after, overrides", [
    (2, 2, {}),  # 4 heads over 2 kv heads: one head from each kv group
    (2, 2, {"model__num_heads": "6", "model__num_kv_heads": "3", "model__head_dim": "16"}),  # 3 kv groups of 2: one whole group
])
def test_structured_prune_is_the_masked_original(heads, kv_after, overrides, tmp_path):
    config, params = _tiny(**overrides)
    cfg = config.model
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16))
    spec = structured.parse_structured(f"heads={heads},ffn=0.25")
    new_cfg, small, kept = structured.prune_structured(cfg, pruned.as_numpy(params), tokens, spec)
    assert (new_cfg.num_heads, new_cfg.num_kv_heads, new_cfg.ffn_dim) == (cfg.num_heads - heads, kv_after, 96)
    assert new_cfg.head_dim == cfg.heads_dim and new_cfg.num_params() < cfg.num_params()
    assert small["layer_0"]["attn"]["q"].shape == (cfg.d_model, new_cfg.num_heads, cfg.heads_dim)
    batch = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)))
    ref = Decoder(cfg).apply({"params": _masked_reference(cfg, params, kept)}, batch)
    assert not np.allclose(ref, Decoder(cfg).apply({"params": params}, batch), atol=1e-3)  # something went
    np.testing.assert_allclose(Decoder(new_cfg).apply({"params": small}, batch), ref, rtol=2e-5, atol=2e-5)
    pruned.save_workdir(str(tmp_path / "out"), pruned.with_model(config, new_cfg, "_s"), small)
    loaded = load_weights(str(tmp_path / "out"))
    assert loaded.cfg.num_heads == new_cfg.num_heads and loaded.cfg.ffn_dim == new_cfg.ffn_dim
    np.testing.assert_allclose(Decoder(loaded.cfg).apply({"params": loaded.params}, batch), ref,
                               rtol=2e-5, atol=2e-5)


def test_structured_refuses_heads_that_split_a_group():
    config = tiny_config(model__num_heads="6", model__num_kv_heads="2", model__head_dim="16")  # groups of 3
    with pytest.raises(ValueError, match="multiple of"):
        structured.pruned_config(config.model, structured.StructuredSpec(heads=1))


def test_prune_model_sequential_and_recover_keeps_zeros():
    config, params = _tiny()
    tokens = np.random.default_rng(0).integers(0, 256, (4, 16))
    out, masks = prune_model(config.model, pruned.as_numpy(params), tokens, "sparsegpt", pattern=(2, 4))
    assert len(masks) == 7 * config.model.num_layers
    q = np.asarray(out["layer_1"]["attn"]["q"]).reshape(config.model.d_model, -1)
    assert np.all(np.count_nonzero(q.reshape(-1, 4, q.shape[1]), axis=1) == 2)
    np.testing.assert_array_equal(out["embedding"], params["embedding"])
    tuned, losses = pruned.recover(pruned.with_model(config, config.model, "_r"), out, 3, 1e-3, masks)
    assert np.array_equal(np.asarray(apply_masks(tuned, masks)["layer_1"]["mlp"]["down"]),
                          np.asarray(tuned["layer_1"]["mlp"]["down"]))
    assert not np.array_equal(np.asarray(tuned["layer_1"]["mlp"]["down"]), out["layer_1"]["mlp"]["down"])
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_prune_cli(tmp_path, capsys):
    config, params = _tiny()
    src = str(tmp_path / "src")
    pruned.save_workdir(src, config, params, step=5)
    out = str(tmp_path / "out")
    assert main(["prune", "--checkpoint", src, "--method", "wanda", "--pattern", "2:4", "--calib", "4",
                 "--out", out]) == 0
    record = json.loads((tmp_path / "out" / "prune.json").read_text())
    assert record["linear_sparsity"] == 0.5 and record["packed_2to4_bits_per_weight"] == 17.0
    loaded = load_weights(out)
    w = np.asarray(loaded.params["layer_0"]["mlp"]["up"])
    assert np.all(np.count_nonzero(w.reshape(-1, 4, w.shape[1]), axis=1) == 2)
    assert main(["prune", "--checkpoint", src, "--method", "wanda", "--out", str(tmp_path / "x")]) == 2
    assert main(["prune", "--checkpoint", src, "--structured", "heads=1", "--out", str(tmp_path / "y")]) == 2
    assert main(["prune", "--checkpoint", src, "--method", "magnitude", "--sparsity", "0.5", "--out", out]) == 2
    assert "--sparsity / --pattern" in capsys.readouterr().err
