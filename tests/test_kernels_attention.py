"""Flash attention kernels (TPU and GPU flavours) in interpret mode against the reference."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.kernels import KernelShapeError, flash_attention, poison_outputs
from tpustack.kernels.reference import attention_reference

TOL = {jnp.float32: (2e-5, 2e-5), jnp.bfloat16: (3e-2, 3e-2)}


def _inputs(B, T, S, N, K, H, dtype, seed=0):
    r = np.random.default_rng(seed)
    mk = lambda *s: jnp.asarray(r.normal(size=s), dtype)
    # Packed sequences: sorted segment ids; every query's segment also appears among the keys.
    qs = np.sort(r.integers(0, 3, (B, T)), axis=1)
    ks = np.sort(np.concatenate([qs, r.integers(0, 3, (B, S - T))], axis=1), axis=1) if S >= T else None
    return mk(B, T, N, H), mk(B, S, K, H), mk(B, S, K, H), jnp.asarray(qs), None if ks is None else jnp.asarray(ks)


# (B, T, S, N, K, H, causal, seg, cap, dtype): ragged T/S, GQA, T<S causal, in-place (H=128) layout
CASES = [
    (2, 40, 72, 4, 2, 32, True, False, None, jnp.float32),
    (1, 64, 64, 4, 1, 128, True, True, 20.0, jnp.bfloat16),
    (1, 24, 24, 2, 2, 64, False, True, None, jnp.float32),
    (1, 8, 136, 6, 2, 16, True, False, 5.0, jnp.float32),
]


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[1]}S{c[2]}N{c[3]}K{c[4]}H{c[5]}{'c' if c[6] else ''}{'s' if c[7] else ''}{jnp.dtype(c[9]).name}")
def test_flash_forward_and_gradients_match_reference(platform, case):
    B, T, S, N, K, H, causal, seg, cap, dtype = case
    q, k, v, qs, ks = _inputs(B, T, S, N, K, H, dtype)
    segs = (qs, ks) if seg else (None, None)
    blocks = dict(block_q=16, block_k=128 if platform == "tpu" else 32)
    f = lambda q, k, v: flash_attention(q, k, v, *segs, causal=causal, soft_cap=cap, impl="pallas",
                                        platform=platform, **blocks)
    g = lambda q, k, v: attention_reference(q, k, v, *segs, causal=causal, soft_cap=cap)
    do = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), dtype)
    with poison_outputs():
        o, vjp = jax.vjp(f, q, k, v)
        grads = vjp(do)
    ro, rvjp = jax.vjp(g, q, k, v)
    rgrads = rvjp(do)
    atol, rtol = TOL[dtype]
    assert o.dtype == dtype and not jnp.isnan(o).any()
    np.testing.assert_allclose(np.asarray(o, np.float32), np.asarray(ro, np.float32), atol=atol, rtol=rtol)
    for name, a, b in zip("qkv", grads, rgrads):
        assert not jnp.isnan(a).any(), f"d{name} has unwritten tiles"
        scale = float(jnp.abs(b.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=atol * max(1.0, scale) * 4, rtol=rtol, err_msg=f"d{name}")


def test_rows_with_no_visible_key_are_zero():
    q, k, v, _, _ = _inputs(1, 16, 16, 2, 2, 32, jnp.float32)
    qs, ks = jnp.zeros((1, 16), jnp.int32), jnp.ones((1, 16), jnp.int32)
    with poison_outputs():
        o = flash_attention(q, k, v, qs, ks, impl="pallas", platform="tpu", block_q=8)
    assert float(jnp.abs(o).max()) == 0.0


def test_impl_switch_and_fallback(caplog):
    q, k, v, qs, _ = _inputs(1, 32, 32, 4, 2, 32, jnp.float32)
    ref = flash_attention(q, k, v, qs, causal=True, impl="reference")
    xla = flash_attention(q, k, v, qs, causal=True, impl="xla")
    np.testing.assert_allclose(ref, xla, atol=2e-5)
    with pytest.raises(KernelShapeError, match="block_q"):
        flash_attention(q, k, v, impl="pallas", platform="tpu", block_q=12)
    with pytest.raises(KernelShapeError, match="power of two"):
        flash_attention(q[..., :24], k[..., :24], v[..., :24], impl="pallas", platform="gpu")
    with caplog.at_level(logging.WARNING, logger="tpustack.kernels"):
        o = flash_attention(q[..., :24], k[..., :24], v[..., :24], impl="auto", platform="gpu")
    assert "falling back to XLA" in caplog.text and "H=24" in caplog.text
    assert o.shape == (1, 32, 4, 24)
    with pytest.raises(KernelShapeError, match="N % K"):
        flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2))
