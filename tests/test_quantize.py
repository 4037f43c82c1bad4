"""Weight quantization (tpustack.compress): RTN, GPTQ against qwix's GPTQ on the same layer and
calibration batch, AWQ's search and folds, the int4_zp model format, and `tpustack quantize`."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.compress import awq, gptq
from tpustack.compress.calibration import linear_inputs
from tpustack.model.grouped import dequantize_grouped, pack_codes, quantize_grouped, unpack_codes
from tpustack.config import ModelConfig


def _layer_and_inputs(k: int = 256, n: int = 96, m: int = 1024, seed: int = 0):
    """A weight [K, N] and correlated inputs [M, K] with a few large channels (as in LLM activations)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    mix = rng.standard_normal((k, k)).astype(np.float32) / np.sqrt(k)
    x = rng.standard_normal((m, k)).astype(np.float32) @ (np.eye(k, dtype=np.float32) + mix)
    x[:, rng.choice(k, 4, replace=False)] *= 20.0
    return w, x


def _out_err(x, w, w_hat) -> float:
    return float(np.sum(np.square(x.astype(np.float64) @ (w - w_hat))))


@pytest.mark.parametrize("bits", [3, 4])
def test_rtn_grid_and_packing(bits):
    w, _ = _layer_and_inputs()
    q = quantize_grouped(w, bits, 128)
    assert q["q"].max() <= 2 ** bits - 1 and q["scale"].shape == (2, 96)
    np.testing.assert_array_equal(unpack_codes(pack_codes(q["q"])), q["q"])
    step = np.repeat(q["scale"], 128, axis=0)
    assert np.all(np.abs(dequantize_grouped(q) - w) <= step * 0.5 + 1e-7)


def test_gptq_layer_error_within_5_percent_of_qwix():
    """The same W, calibration X, 4-bit grid, group 64, block 64 and 1% dampening (qwix runs it
    column by column eagerly, ~0.1 s a column here, so the layer is kept small). qwix 0.1.8's
    GPTQ takes symmetric grids only (an asymmetric one fails on `zero_point and ...` in
    gptq_core.quantize_weight), so both run GPTQ's --sym grid: [-absmax, absmax] in 16 levels."""
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core

    w, x = _layer_and_inputs(k=128, n=64, m=512)
    h = gptq.hessian(x)
    ours = gptq.gptq_quantize(w, h, bits=4, group=64, block=64, sym=True)["w"]
    how = qarray.HowToQuantize(qtype=jnp.int4, channelwise_axes=(0,), tiled_axes={1: 64})
    qw, _ = gptq_core.quantize_weight(jnp.asarray(w.T), jnp.asarray(h, jnp.float32), how, blocksize=64)
    theirs = np.asarray(qarray.dequantize(qw)).T
    rtn = dequantize_grouped(quantize_grouped(w, 4, 64))
    e_ours, e_qwix, e_rtn = _out_err(x, w, ours), _out_err(x, w, theirs), _out_err(x, w, rtn)
    assert e_ours <= 1.05 * e_qwix, (e_ours, e_qwix)
    assert e_ours < 0.9 * e_rtn, (e_ours, e_rtn)  # below even the asymmetric grid's RTN


def test_gptq_act_order_and_groups():
    w, x = _layer_and_inputs(seed=1)
    h = gptq.hessian(x)
    rtn = _out_err(x, w, dequantize_grouped(quantize_grouped(w, 3, 64)))
    for act_order in (False, True):
        r = gptq.gptq_quantize(w, h, bits=3, group=64, act_order=act_order)
        np.testing.assert_allclose(dequantize_grouped(r), r["w"], rtol=1e-6, atol=1e-7)  # codes = weights
        assert r["q"].max() <= 7 and r["scale"].shape == (4, 96)
        assert _out_err(x, w, r["w"]) < 0.7 * rtn


def test_awq_search_beats_rtn_on_outlier_channels():
    w, x = _layer_and_inputs(seed=2)
    s, alpha, err = awq.search_scale(x, [w], bits=4, group=128)
    rtn = float(np.mean(np.square(x @ (w - dequantize_grouped(quantize_grouped(w, 4, 128))))))
    assert alpha > 0 and err < 0.9 * rtn, (alpha, err, rtn)
    assert s.shape == (256,) and np.argmax(s) in np.argsort(-np.abs(x).mean(0))[:4]


def test_awq_folds_leave_the_layer_function_unchanged(heads=(4, 4)):  # MHA: every fold, v -> o included
    from tpustack.weights import init_weights

    cfg = ModelConfig(vocab_size=128, d_model=128, num_layers=1, num_heads=heads[0], num_kv_heads=heads[1],
                      ffn_dim=256, max_seq_len=32)
    cfg, params, _ = init_weights(cfg)
    layer = jax.tree.map(lambda a: np.array(a, np.float32), jax.device_get(params["layer_0"]))
    x = jax.random.normal(jax.random.key(0), (2, 16, 128)) * (1 + 10 * (jnp.arange(128) < 3))
    before = linear_inputs(cfg, layer, x)
    inputs = {k: np.asarray(v) for k, v in before.items() if k != "out"}
    folded, alphas = awq.awq_layer(cfg, jax.tree.map(np.copy, layer), inputs, bits=4, group=128, clip=False)
    after = linear_inputs(cfg, folded, x)
    np.testing.assert_allclose(np.asarray(after["out"]), np.asarray(before["out"]), rtol=2e-4, atol=2e-4)
    assert ("o" in alphas) == (heads[0] == heads[1])


def _gqa_model_and_tokens():
    """A 2-layer GQA decoder with an untied head (small_12m's shape of folds) and calibration tokens."""
    from tpustack.weights import init_weights

    cfg = ModelConfig(vocab_size=128, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=256,
                      max_seq_len=32, tie_embeddings=False)
    cfg, params, _ = init_weights(cfg)
    return cfg, params, np.asarray(jax.random.randint(jax.random.key(2), (4, 32), 0, 128), np.int32)


def test_awq_at_alpha_0_without_clipping_is_rtn(monkeypatch):
    """Grid {0} (s = 1) and no clip shrinks: the same codes, scales and zero points as RTN."""
    from tpustack.compress.quantize import quantize_model

    cfg, params, tokens = _gqa_model_and_tokens()
    monkeypatch.setattr(awq, "GRID", 1)
    monkeypatch.setattr(awq, "CLIP_MAX_SHRINK", 0.0)
    _, got, info = quantize_model(cfg, params, "awq", 4, 128, tokens, progress=False)
    _, want, _ = quantize_model(cfg, params, "rtn", 4, 128, progress=False)
    assert {a for layer in info["alphas"].values() for k, a in
            (layer.items() if isinstance(layer, dict) else [("", layer)]) if not k.startswith("clip")} == {0.0}
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)


def test_awq_model_folds_leave_the_logits_unchanged():
    """Every fold of the driver (norms, up -> down, final_norm -> head; o under GQA unscaled)
    without clipping: the float model's logits do not move, and the weights did."""
    from tpustack.compress.quantize import _as_numpy, _awq_fold
    from tpustack.model import Decoder

    cfg, params, tokens = _gqa_model_and_tokens()
    params = _as_numpy(params)
    for layer in (params["layer_0"], params["layer_1"]):  # outlier channels, so alpha > 0 is chosen
        layer["attn_norm"]["scale"][:3] *= 8.0
        layer["mlp_norm"]["scale"][:3] *= 8.0
    folded = jax.tree.map(np.copy, params)
    alphas = _awq_fold(cfg, folded, tokens, 4, 128, clip=False)
    assert max(alphas["layer_0"].values()) > 0
    before = Decoder(cfg).apply({"params": params}, tokens)
    after = Decoder(cfg).apply({"params": folded}, tokens)
    np.testing.assert_allclose(np.asarray(after), np.asarray(before), rtol=1e-4, atol=1e-4)
    assert not np.allclose(folded["layer_0"]["mlp"]["up"], params["layer_0"]["mlp"]["up"])


def test_awq_clip_search_lowers_the_layer_output_error():
    """auto_clip on heavy-tailed weights: the group-wise shrinks lower the whole output error of
    RTN (never raise it), and some groups are shrunk."""
    rng = np.random.default_rng(3)
    _, x = _layer_and_inputs(seed=3)
    w = (rng.standard_t(3, (256, 96)) * 0.02).astype(np.float32)
    clipped, shrink, errs = awq.search_clip(x, w, bits=4, group=128)
    rtn = _out_err(x, w, dequantize_grouped(quantize_grouped(w, 4, 128)))
    ours = _out_err(x, w, dequantize_grouped(quantize_grouped(clipped, 4, 128)))
    assert ours < 0.9 * rtn, (ours, rtn)
    assert shrink.shape == (2, 96) and 0 < shrink.max() <= 0.45 and shrink.min() == 0
    assert errs["err_clip"] < errs["err_rtn"]
    for seed in range(3):  # Gaussian weights, random inputs: never worse than no clipping
        w, x = _layer_and_inputs(seed=10 + seed)
        clipped, _, _ = awq.search_clip(x, w, bits=3, group=64)
        assert (_out_err(x, w, dequantize_grouped(quantize_grouped(clipped, 3, 64)))
                <= _out_err(x, w, dequantize_grouped(quantize_grouped(w, 3, 64))) * (1 + 1e-6))


@pytest.mark.parametrize("group", [128, 64])  # 128 with K % 256 == 0: int4 kernel + zero-point term
def test_int4_zp_decoder_equals_float_decoder_on_dequantized_weights(group):
    from tpustack.compress.quantize import quantize_model
    from tpustack.model import Decoder
    from tpustack.weights import init_weights

    cfg = ModelConfig(vocab_size=128, d_model=256, num_layers=1, num_heads=4, num_kv_heads=2, ffn_dim=512,
                      max_seq_len=32)
    cfg, params, _ = init_weights(cfg)
    qcfg, qparams, _ = quantize_model(cfg, params, "rtn", bits=4, group=group, progress=False)
    assert qcfg.weight_quant == "int4_zp" and qcfg.weight_group == group
    deq = jax.tree.map(lambda a: np.array(a), jax.device_get(params))
    for sub, name in [("attn", n) for n in "qkvo"] + [("mlp", n) for n in ("gate", "up", "down")]:
        p = qparams["layer_0"][sub]
        q = {"q": unpack_codes(p[f"{name}_codes"]), "scale": p[f"{name}_scale"], "zero": p[f"{name}_zero"]}
        shape = deq["layer_0"][sub][name].shape
        deq["layer_0"][sub][name] = dequantize_grouped(q).reshape(shape)
    q = {"q": unpack_codes(qparams["lm_head_codes"]), "scale": qparams["lm_head_scale"],
         "zero": qparams["lm_head_zero"]}
    deq["lm_head"] = dequantize_grouped(q)
    from tpustack.interop.gguf import dequantized  # what a GGUF export of the checkpoint starts from
    for a, b in zip(jax.tree.leaves(dequantized(qparams, qcfg)[0]), jax.tree.leaves(deq)):
        np.testing.assert_array_equal(a, np.asarray(b, np.float32))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 128)
    got = Decoder(qcfg).apply({"params": qparams}, tokens)
    ref = Decoder(cfg).apply({"params": deq}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-4)
    assert not np.allclose(np.asarray(ref), np.asarray(Decoder(cfg).apply({"params": params}, tokens)), atol=1e-4)


@pytest.mark.slow
def test_quantize_cli_writes_a_directory_load_weights_and_eval_read(tmp_path):
    from tests.helpers import TINY_OVERRIDES
    from tpustack.compress.calibration import calibration_tokens
    from tpustack.compress.quantize import quantize_model, source_config
    from tpustack.model import Decoder
    from tpustack.weights import load_weights

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=root, capture_output=True, text=True,
                              timeout=400)
    run, out = str(tmp_path / "run"), str(tmp_path / "q")
    small = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]
    trained = cli("train", "--config", "configs/tiny.py", *small, "--config.train.steps=2", "--no-samples",
                  "--workdir", run)
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = cli("quantize", "--checkpoint", run, "--method", "gptq", "--bits", "3", "--group", "32", "--calib", "4",
               "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gptq 3-bit g32" in done.stdout and "gptq: 100%" in done.stderr  # the progress bar
    cfg, params, _ = load_weights(run)
    qcfg, qparams, _ = quantize_model(cfg, params, "gptq", 3, 32, calibration_tokens(source_config(run, cfg), 4),
                                      progress=False)
    lcfg, lparams, tok = load_weights(out)
    assert lcfg == qcfg and tok is not None
    tokens = jnp.asarray(np.arange(12, dtype=np.int32)[None] + 60)
    np.testing.assert_array_equal(np.asarray(Decoder(lcfg).apply({"params": lparams}, tokens)),
                                  np.asarray(Decoder(qcfg).apply({"params": qparams},
                                                                 tokens)))
    evaluated = cli("eval", "--workdir", out)
    assert evaluated.returncode == 0 and "held-out loss" in evaluated.stdout, evaluated.stderr[-3000:]
    again = cli("quantize", "--checkpoint", run, "--method", "awq", "--out", out)
    assert again.returncode == 2 and "--out" in again.stderr
