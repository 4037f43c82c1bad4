"""Decode and paged attention kernels (TPU and GPU flavours) in interpret mode."""

import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.kernels import KernelShapeError, decode_attention, paged_attention, poison_outputs
from tpustack.kernels import reference as R

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _rng(seed=0):
    return np.random.default_rng(seed)


def _quant_cache(x):
    """Per-token, per-head int8 quantization of a float cache [.., K, H]."""
    s = np.abs(x).max(-1) / 127.0
    return jnp.asarray(np.round(x / s[..., None]), jnp.int8), jnp.asarray(s, jnp.float32)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("H,dtype,int8", [(128, jnp.float32, False), (64, jnp.bfloat16, False), (128, jnp.float32, True)])
def test_decode_matches_reference(platform, H, dtype, int8):
    r = _rng()
    B, S, N, K = 3, 256, 8, 2
    q = jnp.asarray(r.normal(size=(B, N, H)), dtype)
    kf, vf = r.normal(size=(B, S, K, H)), r.normal(size=(B, S, K, H))
    lens = jnp.array([1, 130, 256])  # one token, a ragged middle, a full cache
    kw = dict(soft_cap=None if int8 else 15.0)
    if int8:
        (k, ks), (v, vs) = _quant_cache(kf), _quant_cache(vf)
        kw.update(k_scale_BSK=ks, v_scale_BSK=vs)
    else:
        k, v = jnp.asarray(kf, dtype), jnp.asarray(vf, dtype)
    with poison_outputs():
        o = decode_attention(q, k, v, lens, impl="pallas", platform=platform,
                             block=128 if platform == "tpu" else 32, **kw)
    ref = R.decode_attention_reference(q, k, v, lens, **{a: b for a, b in kw.items()})
    assert o.dtype == dtype and not jnp.isnan(o).any()
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ref, np.float32), atol=TOL[dtype], rtol=TOL[dtype])
    if int8:  # the in-kernel dequantization is close to attention over the float cache
        full = R.decode_attention_reference(q, jnp.asarray(kf, dtype), jnp.asarray(vf, dtype), lens)
        np.testing.assert_allclose(np.asarray(o), np.asarray(full), atol=0.05)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("int8", [False, True])
def test_paged_matches_reference(platform, int8):
    r = _rng(1)
    B, N, K, H, P, L, M = 3, 4, 2, 128, 20, 16, 4
    q = jnp.asarray(r.normal(size=(B, N, H)), jnp.float32)
    kf, vf = r.normal(size=(P, L, K, H)), r.normal(size=(P, L, K, H))
    table = jnp.asarray(r.permutation(P)[: B * M].reshape(B, M), jnp.int32)  # scattered pages
    lens = jnp.array([5, 33, 64])
    kw = {}
    if int8:
        (k, ks), (v, vs) = _quant_cache(kf), _quant_cache(vf)
        kw = dict(k_scale_PLK=ks, v_scale_PLK=vs)
    else:
        k, v = jnp.asarray(kf, jnp.float32), jnp.asarray(vf, jnp.float32)
    with poison_outputs():
        o = paged_attention(q, k, v, table, lens, impl="pallas", platform=platform, **kw)
    ref = R.paged_attention_reference(q, k, v, table, lens, **kw)
    assert not jnp.isnan(o).any()
    np.testing.assert_allclose(o, ref, atol=2e-5, rtol=2e-5)
    # and the paged reference equals contiguous decode over the gathered cache
    dec = R.decode_attention_reference(q, R.gather_pages(k, table), R.gather_pages(v, table), lens,
                                       k_scale_BSK=R.gather_pages(ks, table) if int8 else None,
                                       v_scale_BSK=R.gather_pages(vs, table) if int8 else None)
    np.testing.assert_allclose(ref, dec, atol=1e-6)


def test_decode_checks():
    q = jnp.ones((1, 4, 64))
    k = jnp.ones((1, 100, 2, 64))
    with pytest.raises(KernelShapeError, match="S=100"):
        decode_attention(q, k, k, jnp.array([3]), impl="pallas", platform="tpu")
    with pytest.raises(KernelShapeError, match="H % 128"):
        paged_attention(q, jnp.ones((4, 16, 2, 64)), jnp.ones((4, 16, 2, 64)), jnp.zeros((1, 2), jnp.int32),
                        jnp.array([3]), impl="pallas", platform="tpu")
    o = decode_attention(q, k, k, jnp.array([3]), impl="auto", platform="tpu")  # falls back, still right
    np.testing.assert_allclose(o, jnp.ones((1, 4, 64)), atol=1e-6)
