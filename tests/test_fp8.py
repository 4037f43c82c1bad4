"""train.precision=fp8: the quantize / delayed-scale logic against a numpy (ml_dtypes) reference,
the fp8 matmul's forward and custom VJP against numpy, tiny training close to f32, and the
fp8 train step compiled for a TPU topology with its dots still taking fp8 operands."""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import random_batch, require_libtpu, tiny_config

from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.mesh import global_batch, make_mesh
from tpustack.model.fp8 import (AMAX_HISTORY, E4M3, E5M2, fp8_matmul, push_amax, quantize, scale_from_history)
from tpustack.train.step import Fp8TrainState, Trainer

NP_FORMATS = {E4M3: (ml_dtypes.float8_e4m3fn, 448.0), E5M2: (ml_dtypes.float8_e5m2, 57344.0)}


def np_scale(history):
    amax = np.max(history)
    return np.float32(NP_FORMATS[E4M3][1] / amax) if amax > 0 else np.float32(1.0)


def np_quantize(x, fmt, scale):
    dtype, top = NP_FORMATS[fmt]
    return np.clip(x.astype(np.float32) * np.float32(scale), -top, top).astype(dtype)


@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_quantize_and_scale_match_numpy(fmt):
    rng = np.random.default_rng(0)
    history = np.abs(rng.normal(size=AMAX_HISTORY)).astype(np.float32)
    x = (rng.normal(size=(64, 48)) * 2.0).astype(np.float32)  # some |x| beyond max(history): saturate
    top = NP_FORMATS[fmt][1]
    scale = scale_from_history(jnp.asarray(history), fmt)
    np.testing.assert_allclose(float(scale), top / history.max(), rtol=1e-7)
    got = np.asarray(quantize(jnp.asarray(x), fmt, scale))
    ref = np_quantize(x, fmt, np.float32(scale))
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))  # bit for bit
    assert np.abs(got.astype(np.float32)).max() == top  # saturated, not inf / nan
    assert float(scale_from_history(jnp.zeros(AMAX_HISTORY), fmt)) == 1.0
    pushed = np.asarray(push_amax(jnp.asarray(history), jnp.asarray(x)))
    np.testing.assert_array_equal(pushed, np.concatenate([[np.abs(x).max()], history[:-1]]))


def test_fp8_matmul_and_its_vjp_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    w = (rng.normal(size=(64, 24)) * 0.1).astype(np.float32)
    g = (rng.normal(size=(32, 24)) * 1e-3).astype(np.float32)
    hist = np.stack([np.full(AMAX_HISTORY, 5.0), np.full(AMAX_HISTORY, 0.5), np.full(AMAX_HISTORY, 5e-3)])
    hist = hist.astype(np.float32)
    y, vjp = jax.vjp(fp8_matmul, jnp.asarray(x), jnp.asarray(w), jnp.asarray(hist))
    dx, dw, new_hist = vjp(jnp.asarray(g))
    sx, sw = 448.0 / 5.0, 448.0 / 0.5
    sg = 57344.0 / 5e-3
    xq = np_quantize(x, E4M3, sx).astype(np.float64)
    wq = np_quantize(w, E4M3, sw).astype(np.float64)
    gq = np_quantize(g, E5M2, sg).astype(np.float64)
    np.testing.assert_allclose(y, xq @ wq / (np.float32(sx) * np.float32(sw)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dx, gq @ wq.T / (np.float32(sg) * np.float32(sw)), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(dw, xq.T @ gq / (np.float32(sx) * np.float32(sg)), rtol=1e-5, atol=1e-9)
    assert not np.allclose(y, x @ w, rtol=1e-4)  # the operands really went through fp8
    assert np.linalg.norm(y - x @ w) < 0.1 * np.linalg.norm(x @ w)  # and came back close (e4m3: ~6%)
    expect = [np.concatenate([[np.abs(a).max()], h[:-1]]) for a, h in zip((x, w, g), hist)]
    np.testing.assert_allclose(new_hist, np.stack(expect), rtol=1e-7)  # the next state, not a gradient


def _train(precision: str, steps: int) -> tuple[list[float], object]:
    config = tiny_config(train__precision=precision, train__lr="3e-3")
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    tokens = load_tokens(config.data, load_tokenizer("byte"))["train"]
    batches = Batcher(tokens, config.train.batch_size, config.train.seq_len, 0)
    losses = []
    for step in range(steps):
        batch = global_batch(batches.host_batch(step), trainer.batch_sharding, config.train.batch_size)
        state, metrics = trainer.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    return losses, state


def test_fp8_training_tracks_f32():
    f32, _ = _train("f32", 30)
    fp8, state = _train("fp8", 30)
    assert isinstance(state, Fp8TrainState)
    assert fp8 != f32  # fp8 is in effect
    assert np.mean(fp8[-5:]) < 0.7 * np.mean(fp8[:5])  # it learns
    assert abs(np.mean(fp8[-5:]) - np.mean(f32[-5:])) < 0.02 * np.mean(f32[-5:])  # within 2% of f32
    hist = np.asarray(state.fp8["layer_1"]["mlp"]["down"])
    assert hist.shape == (3, AMAX_HISTORY) and np.all(hist > 0)  # input, weight and gradient amax recorded
    assert state.params["layer_1"]["mlp"]["down"].dtype == jnp.float32  # fp32 master weights


def test_fp8_train_step_compiles_for_tpu_with_fp8_dots():
    require_libtpu()
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from tpustack.train.aot import compile_train_step_full, devices_for

    config = tiny_config(train__batch_size=16, train__precision="fp8", mesh__fsdp=4)
    hlo = compile_train_step_full(config, devices_for("tpu", "v6e:2x2")).as_text()
    types = {}  # instruction name -> element type
    for line in hlo.splitlines():
        found = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+)\[", line)
        if found:
            types[found.group(1)] = found.group(2)
    dots = [re.search(r" (?:convolution|dot)\(([^)]*)\)", line) for line in hlo.splitlines()]
    operand_types = {types.get(op.strip().split(" ")[-1].lstrip("%")) for d in dots if d for op in d.group(1).split(",")}
    # forward e4m3 x e4m3, backward e5m2 x e4m3: the TPU program multiplies fp8 operands
    assert {"f8e4m3fn", "f8e5m2"} <= operand_types, operand_types


def test_fp8_grad_accum_keeps_the_steps_amax():
    """Over microbatches the next history holds the whole batch's amax (their max), as one big batch."""
    states = {}
    for accum in (1, 2):
        config = tiny_config(train__precision="fp8", train__grad_accum=str(accum))
        trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
        state = trainer.init(jax.random.key(0))
        batch = global_batch(random_batch(8, 16, 256), trainer.batch_sharding, 8)
        states[accum], _ = trainer.train_step(state, batch)
    one, two = (np.asarray(states[a].fp8["layer_0"]["attn"]["o"]) for a in (1, 2))
    assert np.all(one[:, 0] > 0)
    np.testing.assert_allclose(two, one, rtol=1e-5)
    # Adam's first step is ~lr * sign(g): only gradients near zero may land differently
    same = np.isclose(states[2].params["layer_0"]["attn"]["o"], states[1].params["layer_0"]["attn"]["o"],
                      rtol=1e-4, atol=1e-6)
    assert same.mean() > 0.99
