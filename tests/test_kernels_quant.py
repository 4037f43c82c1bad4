"""Quantized matmul kernels in interpret mode, and the quantizers they rely on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.kernels import KernelShapeError, int4_matmul, int8_matmul, poison_outputs, w8a8_matmul
from tpustack.kernels import reference as R

TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}


def _data(M, K, N, dtype, seed=0):
    r = np.random.default_rng(seed)
    return jnp.asarray(r.normal(size=(M, K)), dtype), jnp.asarray(r.normal(size=(K, N)) * 0.05, jnp.float32)


def test_quantizers_round_trip():
    _, w = _data(1, 512, 128, jnp.float32)
    q8, s8 = R.quantize_int8(w)
    assert float(jnp.abs(q8 * s8 - w).max()) <= float(s8.max()) / 2 + 1e-7
    p4, s4 = R.quantize_int4(w)
    assert p4.shape == (256, 128) and s4.shape == (4, 128)
    assert float(jnp.abs(R.dequantize_int4(p4, s4) - w).max()) <= float(s4.max()) / 2 + 1e-7


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("M,K,N,dtype", [(1, 512, 256, jnp.float32), (13, 256, 384, jnp.bfloat16), (40, 1024, 128, jnp.float32)])
def test_weight_only_matmuls_match_reference(platform, M, K, N, dtype):
    x, w = _data(M, K, N, dtype)
    q8, s8 = R.quantize_int8(w)
    p4, s4 = R.quantize_int4(w)
    with poison_outputs():
        y8 = int8_matmul(x, q8, s8, impl="pallas", platform=platform)
        y4 = int4_matmul(x, p4, s4, impl="pallas", platform=platform)
    for y, ref in ((y8, R.int8_matmul_reference(x, q8, s8)), (y4, R.int4_matmul_reference(x, p4, s4))):
        assert y.shape == (M, N) and y.dtype == dtype and not jnp.isnan(y).any()
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype] * 10, rtol=TOL[dtype])


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_weight_only_gradient_in_x(platform):
    x, w = _data(3, 256, 128, jnp.float32)
    p4, s4 = R.quantize_int4(w)
    g = jax.grad(lambda x: (int4_matmul(x, p4, s4, impl="pallas", platform=platform) ** 2).sum())(x)
    gr = jax.grad(lambda x: (R.int4_matmul_reference(x, p4, s4) ** 2).sum())(x)
    np.testing.assert_allclose(g, gr, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_w8a8_matches_reference(dtype):
    x, w = _data(9, 512, 256, dtype)
    q8, s8 = R.quantize_int8(w)
    with poison_outputs():
        y = w8a8_matmul(x[None], q8, s8, impl="pallas", platform="tpu")  # leading dims flatten
    ref = R.w8a8_matmul_reference(x, q8, s8)
    assert y.shape == (1, 9, 256)
    np.testing.assert_allclose(np.asarray(y[0], np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype])
    full = x.astype(jnp.float32) @ w  # and int8 x int8 stays near the float product
    assert float(jnp.abs(y[0].astype(jnp.float32) - full).max()) < 0.05 * float(jnp.abs(full).max())


def test_quant_checks_and_fallback():
    x, w = _data(2, 256, 100, jnp.float32)
    q8, s8 = R.quantize_int8(w)
    with pytest.raises(KernelShapeError, match="N=100"):
        int8_matmul(x, q8, s8, impl="pallas", platform="tpu")
    y = int8_matmul(x, q8, s8, impl="auto", platform="tpu")
    np.testing.assert_allclose(y, R.int8_matmul_reference(x, q8, s8), atol=1e-5)
    with pytest.raises(KernelShapeError, match="scale"):
        int8_matmul(x, q8, s8[:50])
    q8, s8 = R.quantize_int8(_data(2, 256, 128, jnp.float32)[1])
    with pytest.raises(KernelShapeError, match="TPU kernel only"):
        w8a8_matmul(x, q8, s8, impl="pallas", platform="gpu")
