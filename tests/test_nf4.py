"""NF4 against its peer, bitsandbytes' CPU implementation, on the same tensors; and a Decoder
with weight_quant="nf4" against the float Decoder with the dequantized weights."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.model.nf4 import (ABSMAX_BLOCK, NF4_LEVELS, blockwise_codes, dequantize_nf4, dynamic_map,
                                   nf4_bits_per_param, quantize_nf4)

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnbF = pytest.importorskip("bitsandbytes.functional")


def _bnb_blockwise_reference(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """bitsandbytes' quantize_blockwise through its torch reference kernel (the 'default' backend
    that the compiled CPU library overrides)."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    q, absmax = op.redispatch(torch._C.DispatchKeySet("CompositeExplicitAutograd"), torch.from_numpy(x),
                              bnbF.create_dynamic_map(), block)
    return q.numpy(), absmax.numpy()


@pytest.mark.parametrize("shape", [(96, 384), (37, 129)])  # the second: ragged last blocks, odd count
def test_nf4_codes_and_absmax_bit_equal_bitsandbytes(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    packed, state = bnbF.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4",
                                       compress_statistics=False)
    q = quantize_nf4(w)
    np.testing.assert_array_equal(q["codes"], packed.numpy().reshape(-1))
    _, absmax = blockwise_codes(w.reshape(-1), NF4_LEVELS, 64)
    np.testing.assert_array_equal(absmax, state.absmax.numpy())
    np.testing.assert_array_equal(NF4_LEVELS, bnbF.get_4bit_type("nf4", device="cpu").numpy())
    # dequantized through bitsandbytes with our (double-quantized) absmax: the same tensor as ours
    ours = np.asarray(dequantize_nf4(q, shape))
    offset = q["absmax_offset"][0]
    absmax_dq = bnbF.dequantize_blockwise(torch.from_numpy(q["absmax_codes"]),
                                          absmax=torch.from_numpy(q["absmax_scale"]),
                                          code=bnbF.create_dynamic_map(), blocksize=ABSMAX_BLOCK).numpy() + offset
    state.absmax = torch.from_numpy(absmax_dq)
    theirs = bnbF.dequantize_4bit(packed, state).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)
    assert np.abs(ours - w).max() < 0.2 * np.abs(w).max()  # and it is a quantization of w


def test_double_quantization_bit_equal_bitsandbytes():
    """The second level (absmax - mean, 8-bit dynamic map, blocks of 256) bit-equal to bitsandbytes'
    reference kernel; its compiled CPU kernel's binary search rounds values within ~1e-5 of a
    midpoint between levels the other way (~0.15% of them): those are one level apart."""
    np.testing.assert_array_equal(dynamic_map(), bnbF.create_dynamic_map().numpy())
    w = np.random.default_rng(1).standard_normal((256, 384)).astype(np.float32)
    _, absmax = blockwise_codes(w.reshape(-1), NF4_LEVELS, 64)
    q = quantize_nf4(w)
    offset = q["absmax_offset"][0]
    assert abs(offset - torch.from_numpy(absmax).mean().item()) <= 2 * np.spacing(offset)
    ref_codes, ref_scale = _bnb_blockwise_reference(absmax - offset, ABSMAX_BLOCK)
    np.testing.assert_array_equal(q["absmax_codes"], ref_codes)
    np.testing.assert_array_equal(q["absmax_scale"], ref_scale)
    cpu_codes, cpu_state = bnbF.quantize_blockwise(torch.from_numpy(absmax - offset), blocksize=ABSMAX_BLOCK)
    np.testing.assert_array_equal(q["absmax_scale"], cpu_state.absmax.numpy())
    differ = q["absmax_codes"] != cpu_codes.numpy()
    assert differ.mean() < 0.01
    assert np.all(np.abs(q["absmax_codes"][differ].astype(int) - cpu_codes.numpy()[differ]) == 1)


def test_nf4_storage_bits_per_param():
    w = np.random.default_rng(2).standard_normal((1024, 384)).astype(np.float32)
    bits = nf4_bits_per_param(quantize_nf4(w), w.size)
    assert abs(bits - 4.127) < 0.01, bits


def test_decoder_nf4_equals_float_decoder_with_dequantized_weights():
    from flax import linen as nn

    from tpustack.config import ModelConfig
    from tpustack.model import Decoder
    from tpustack.model.quant import quantize_params
    from tpustack.weights import init_weights

    cfg = ModelConfig(vocab_size=128, d_model=128, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=256,
                      max_seq_len=64, tie_embeddings=False)
    cfg, params, _ = init_weights(cfg)
    qparams = quantize_params(params, "nf4")
    qcfg = dataclasses.replace(cfg, weight_quant="nf4")
    # the quantized tree has exactly the shapes and dtypes the nf4 Decoder declares
    want = jax.eval_shape(lambda: Decoder(qcfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    assert jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(want)) == \
        jax.tree.map(lambda a: (a.shape, a.dtype), qparams)

    def dequantized(tree: dict, like: dict) -> dict:
        out = {}
        for key, value in like.items():
            if isinstance(value, dict):
                out[key] = dequantized(tree[key], value)
            elif key in tree:
                out[key] = tree[key]
            else:
                q = {p: tree[f"{key}_nf4_{p}"] for p in ("codes", "absmax_codes", "absmax_scale", "absmax_offset")}
                k = value.shape[0] * (value.shape[1] if key == "o" else 1)
                out[key] = dequantize_nf4(q, (value.size // k, k)).T.reshape(value.shape)
        return out

    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    got = Decoder(qcfg).apply({"params": qparams}, tokens)
    ref = Decoder(cfg).apply({"params": dequantized(qparams, params)}, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    full = Decoder(cfg).apply({"params": params}, tokens)
    rms = lambda a: float(jnp.sqrt(jnp.mean(jnp.square(a))))  # noqa: E731
    assert 0 < rms(got - full) < 0.3 * rms(full)
