"""Decode and paged attention kernels (TPU and GPU flavours) in interpret mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.kernels import KernelShapeError, decode_attention, paged_attention, poison_outputs
from tpustack.kernels import paged_attention_cpu
from tpustack.kernels import reference as R

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}


def _rng(seed=0):
    return np.random.default_rng(seed)


def np_decode_attention(q_BNH, k_BSKH, v_BSKH, lengths_B, soft_cap=None):
    """Plain softmax attention in float64 numpy: query head n reads kv head n // (N / K)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BNH, k_BSKH, v_BSKH))
    B, N, H = q.shape
    G = N // k.shape[2]
    o_BNH = np.zeros((B, N, H))
    for b in range(B):
        n_keys = int(lengths_B[b])
        for n in range(N):
            s = k[b, :n_keys, n // G] @ q[b, n] / np.sqrt(H)
            if soft_cap:
                s = soft_cap * np.tanh(s / soft_cap)
            p = np.exp(s - s.max())
            o_BNH[b, n] = (p / p.sum()) @ v[b, :n_keys, n // G]
    return o_BNH


def np_gather_pages(pages_PLKH, table_BM):
    """Sequence b's token s is page table[b, s // L], slot s % L: contiguous [B, M*L, ...]."""
    pages, table = np.asarray(pages_PLKH), np.asarray(table_BM)
    B, M = table.shape
    L = pages.shape[1]
    out = np.empty((B, M * L, *pages.shape[2:]), pages.dtype)
    for b in range(B):
        for s in range(M * L):
            out[b, s] = pages[table[b, s // L], s % L]
    return out


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
    assert not jnp.isnan(o).any()
    # independent oracle: gather the pages with numpy, dequantize, plain softmax attention
    k_np, v_np = np.asarray(k, np.float64), np.asarray(v, np.float64)
    if int8:
        k_np, v_np = k_np * np.asarray(ks)[..., None], v_np * np.asarray(vs)[..., None]
    expect = np_decode_attention(q, np_gather_pages(k_np, table), np_gather_pages(v_np, table), lens)
    np.testing.assert_allclose(o, expect, atol=2e-5, rtol=2e-5)
    # the jnp reference (the fallback's math) agrees with the oracle too
    np.testing.assert_allclose(R.paged_attention_reference(q, k, v, table, lens, **kw), expect, atol=2e-5, rtol=2e-5)


def test_decode_checks():
    q = jnp.ones((1, 4, 64))
    k = jnp.ones((1, 100, 2, 64))
    with pytest.raises(KernelShapeError, match="S=100"):
        decode_attention(q, k, k, jnp.array([3]), impl="pallas", platform="tpu")
    with pytest.raises(KernelShapeError, match="H % 128"):
        paged_attention(q, jnp.ones((4, 16, 2, 64)), jnp.ones((4, 16, 2, 64)), jnp.zeros((1, 2), jnp.int32),
                        jnp.array([3]), impl="pallas", platform="tpu")
    # S=100 has no TPU tiling: auto falls back to XLA, and the result is still attention
    r = _rng(2)
    q, k, v = (jnp.asarray(r.normal(size=shape), jnp.float32) for shape in ((2, 4, 64), (2, 100, 2, 64), (2, 100, 2, 64)))
    lens = jnp.array([3, 100])
    with poison_outputs():
        o = decode_attention(q, k, v, lens, impl="auto", platform="tpu")
    assert not jnp.isnan(o).any()
    np.testing.assert_allclose(o, np_decode_attention(q, k, v, lens), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("H,L,dtype,soft_cap", [(64, 16, "float32", None), (128, 8, "bfloat16", None),
                                                 (48, 32, "float32", 5.0)])
def test_native_cpu_paged_kernel_matches_the_oracle(H, L, dtype, soft_cap):
    """The native CPU kernel (kernels/paged_attention_cpu.cc) against the numpy oracle on scattered
    pages: empty rows, part pages, several 16-slot blocks per page, GQA, bf16 pages, soft cap."""
    if paged_attention_cpu.unavailable():
        pytest.skip(paged_attention_cpu.unavailable())
    r = _rng(3)
    B, N, K, P, M = 6, 6, 2, 40, 6
    q = jnp.asarray(r.normal(size=(B, N, H)), jnp.float32)
    k, v = (jnp.asarray(r.normal(size=(P, L, K, H)), dtype) for _ in range(2))
    table = jnp.asarray(r.permutation(P)[: B * M].reshape(B, M), jnp.int32)
    lens = jnp.array([0, 1, L - 1, L + 1, 3 * L + 5, M * L])
    o = jax.jit(lambda *a: paged_attention(*a, impl="cpu", soft_cap=soft_cap))(q, k, v, table, lens)
    k_np, v_np = np.asarray(k.astype(jnp.float32), np.float64), np.asarray(v.astype(jnp.float32), np.float64)
    expect = np_decode_attention(q[1:], np_gather_pages(k_np, table[1:]), np_gather_pages(v_np, table[1:]), lens[1:],
                                 soft_cap=soft_cap)
    np.testing.assert_allclose(o[1:], expect, atol=2e-5, rtol=2e-5)
    assert not np.asarray(o[0]).any()  # no keys: zeros, as the reference gives
    np.testing.assert_allclose(R.paged_attention_reference(q, k, v, table, lens, soft_cap=soft_cap)[0], 0.0)


def test_native_cpu_paged_kernel_refuses_what_it_cannot_read():
    q = jnp.ones((1, 2, 8))
    pages = jnp.ones((4, 16, 2, 8))
    with pytest.raises(KernelShapeError, match="multiple of 16"):
        paged_attention(q, pages, pages, jnp.zeros((1, 2), jnp.int32), jnp.array([3]), impl="cpu")
    with pytest.raises(KernelShapeError, match="float16"):
        paged_attention(jnp.ones((1, 2, 16)), jnp.ones((4, 16, 2, 16), jnp.float16), jnp.ones((4, 16, 2, 16), jnp.float16),
                        jnp.zeros((1, 2), jnp.int32), jnp.array([3]), impl="cpu")


@pytest.mark.parametrize("H,L,dtype", [(64, 16, "float32"), (64, 8, "bfloat16"), (32, 16, "float32")])
def test_native_cpu_tile_attention_matches_the_oracle(H, L, dtype):
    """tile_attention_cpu (a prefill chunk's query tiles, causal, pages read in place, queries read
    from and outputs written to the step's rows) against a float64 softmax per query: full, part
    and padded tiles, a tile not aligned to a block, rows in no tile (zeros), GQA, bf16 pages,
    the 4-query V path (H = 64) and the one-query path (H = 32)."""
    if paged_attention_cpu.unavailable():
        pytest.skip(paged_attention_cpu.unavailable())
    r = _rng(5)
    X, Q, N, K, P, M, T = 5, 16, 6, 2, 60, 8, 70
    k, v = (jnp.asarray(r.normal(size=(P, L, K, H)), dtype) for _ in range(2))
    table = r.permutation(P)[: X * M].reshape(X, M).astype(np.int32)
    pos, tok = np.full((X, Q), -1, np.int32), np.full((X, Q), T, np.int32)  # padding: no position, row T
    pos[0], pos[1, :10], pos[2, :3], pos[4] = np.arange(16), np.arange(L * M - 10, L * M), [5, 6, 7], np.arange(37, 53)
    rows = r.permutation(T)  # the step's rows in any order; those left over are in no tile
    tok[pos >= 0] = rows[: (pos >= 0).sum()]
    q = r.normal(size=(T, N, H)).astype(np.float32)
    got = np.asarray(jax.jit(paged_attention_cpu.tile_attention_cpu, static_argnums=6)(
        jnp.asarray(q), k, v, jnp.asarray(table), jnp.asarray(pos), jnp.asarray(tok), H ** -0.5))
    k_np, v_np = (np.asarray(a.astype(jnp.float32), np.float64) for a in (k, v))
    want = np.zeros_like(got, np.float64)
    for x, i in zip(*np.nonzero(pos >= 0)):
        keys = np.arange(pos[x, i] + 1)
        ks, vs = k_np[table[x, keys // L], keys % L], v_np[table[x, keys // L], keys % L]  # [S, K, H]
        for n in range(N):
            s = ks[:, n // (N // K)] @ q[tok[x, i], n] * H ** -0.5
            p = np.exp(s - s.max())
            want[tok[x, i], n] = p @ vs[:, n // (N // K)] / p.sum()
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    assert not got[rows[(pos >= 0).sum():]].any()  # rows in no tile: zeros


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_native_cpu_slot_writes_equal_xla_scatter(dtype):
    """write_slots_cpu (in place) gives XLA's .at[page, slot].set bit for bit: round to nearest even,
    NaN, duplicate slots, and out-of-range pages dropped."""
    if paged_attention_cpu.unavailable():
        pytest.skip(paged_attention_cpu.unavailable())
    r = _rng(4)
    pool = jnp.asarray(r.normal(size=(10, 8, 2, 16)), dtype)
    rows = jnp.asarray(r.normal(size=(6, 2, 16)) * 1e3, jnp.float32).at[0, 0, 0].set(jnp.nan)
    page, slot = jnp.array([1, 3, 3, 9, 12, 0]), jnp.array([0, 7, 2, 5, 1, 3])
    want = np.asarray(pool.at[page, slot].set(rows.astype(dtype)).astype(jnp.float32))
    got = np.asarray(jax.jit(paged_attention_cpu.write_slots_cpu)(pool, page, slot, rows).astype(jnp.float32))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.nan_to_num(got), np.nan_to_num(want))


def test_without_a_working_compiler_paged_attention_falls_back_to_xla(tmp_path):
    """A failed build (here CXX=false) is a reason, not an error: auto on CPU then picks XLA."""
    import os
    import subprocess
    import sys
    code = ("from tpustack.kernels import paged_attention_cpu as p, paged_attention_impl as i; "
            "print(p.unavailable()); print(i(16, 64, 'float32'))")
    env = dict(os.environ, CXX="false", TPUSTACK_KERNEL_CACHE=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    reason, impl = out.stdout.strip().splitlines()[-2:]
    assert "failed" in reason and impl == "xla"
