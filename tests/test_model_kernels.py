"""The model on tpustack.kernels: Pallas attention (interpret mode on CPU) and quantized weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from tpustack.config import MeshConfig, ModelConfig
from tpustack.infer.decode import Generator
from tpustack.mesh import make_mesh, mesh_context, param_shardings, rules_for
from tpustack.model import Decoder
from tpustack.model.quant import quantize_params, weight_bytes

CFG = ModelConfig(vocab_size=128, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=64, init_std=0.2)


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.fixture(scope="module")
def params():
    return meta.unbox(Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def tokens(b=2, t=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t)))


def test_pallas_attention_logits_and_grads_match_xla(params):
    pallas = dataclasses.replace(CFG, attention_impl="pallas")
    x = tokens()
    ref = Decoder(CFG).apply({"params": params}, x)
    out = Decoder(pallas).apply({"params": params}, x)
    assert rel_err(out, ref) < 2e-5

    def loss(cfg, p):
        return jnp.mean(jax.nn.log_softmax(Decoder(cfg).apply({"params": p}, x))[..., 0])

    g_ref, g_pallas = jax.grad(lambda p: loss(CFG, p))(params), jax.grad(lambda p: loss(pallas, p))(params)
    for a, b in zip(jax.tree.leaves(g_pallas), jax.tree.leaves(g_ref)):
        assert rel_err(a, b) < 1e-4


def test_pallas_attention_on_a_mesh_runs_inside_shard_map(params):
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    rules = rules_for("default")
    pallas = dataclasses.replace(CFG, attention_impl="pallas")
    sharded = jax.device_put(params, param_shardings(CFG, mesh, rules))
    x = tokens(b=4)
    with mesh_context(mesh, rules):
        out = jax.jit(lambda p, t: Decoder(pallas).apply({"params": p}, t))(sharded, x)
    assert rel_err(out, Decoder(CFG).apply({"params": params}, x)) < 2e-5


def test_pallas_decode_attention_gives_the_same_tokens(params):
    batch = [[3, 4, 5], list(range(10, 27))]
    ref = Generator(CFG, params).generate(batch, 6)
    assert Generator(dataclasses.replace(CFG, attention_impl="pallas"), params).generate(batch, 6) == ref
    int8_ref = Generator(CFG, params, cache_dtype="int8").generate(batch, 6)
    out = Generator(dataclasses.replace(CFG, attention_impl="pallas"), params, cache_dtype="int8").generate(batch, 6)
    assert out == int8_ref


def dequantized(params, qparams, mode):
    """The float tree whose matmul weights are exactly what the quantized tree represents."""
    from tpustack.kernels.reference import dequantize_int4

    def walk(p, q):
        out = {}
        for key, value in p.items():
            if isinstance(value, dict):
                out[key] = walk(value, q[key])
            elif f"{key}_{mode}" in q:
                w, scale = q[f"{key}_{mode}"], q[f"{key}_scale"]
                flat = w.astype(jnp.float32) * scale[None] if mode == "int8" else dequantize_int4(w, scale)
                out[key] = flat.reshape(value.shape)
            else:
                out[key] = value
        return out
    return walk(params, qparams)


@pytest.mark.parametrize("mode,tolerance,ratio", [("int8", 0.03, 0.27), ("int4", 0.6, 0.16)])
def test_quantized_weights_track_float_logits(mode, tolerance, ratio):
    cfg = ModelConfig(vocab_size=256, d_model=256, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=128,
                      ffn_dim=512, max_seq_len=64, init_std=0.05)
    params = meta.unbox(Decoder(cfg).init(jax.random.key(1), jnp.zeros((1, 8), jnp.int32))["params"])
    qcfg = dataclasses.replace(cfg, weight_quant=mode)
    qparams = quantize_params(params, mode)
    x = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)))
    ref = Decoder(cfg).apply({"params": params}, x)
    out = Decoder(qcfg).apply({"params": qparams}, x)
    # exact wiring: the quantized model is the float model on the dequantized weights
    assert rel_err(out, Decoder(cfg).apply({"params": dequantized(params, qparams, mode)}, x)) < 1e-5
    assert rel_err(out, ref) < tolerance  # and quantization error itself stays bounded
    matmul = lambda p: sum(np.asarray(v).nbytes for k, v in jax.tree_util.tree_leaves_with_path(p)  # noqa: E731
                           if "embedding" not in jax.tree_util.keystr(k) and "norm" not in jax.tree_util.keystr(k))
    assert matmul(qparams) <= ratio * matmul(params)  # int8 ~1/4 of f32 (+ scales), int4 ~1/8
    assert weight_bytes(qparams) < weight_bytes(params)
    gen = Generator(qcfg, qparams).generate([[1, 2, 3]], 5)
    assert len(gen[0]) == 5
