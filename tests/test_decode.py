"""The decode loop: KV cache (f32 and int8), prefill buckets, EOS / max tokens, compile counts."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer.cache import cache_bytes, init_cache
from tpustack.infer.decode import Generator
from tpustack.infer.sampling import SamplingParams
from tpustack.model import Decoder

CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=128, init_std=0.3)


@pytest.fixture(scope="module")
def params():
    return Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


def greedy_reference(params, prompt, n):
    """Greedy continuation by recomputing the full forward pass for every token (no cache)."""
    from flax.linen import meta

    forward = jax.jit(lambda p, t: Decoder(CFG).apply({"params": p}, t))
    tokens = list(prompt)
    for _ in range(n):  # a fixed 64-token buffer: causal, so the padding never matters
        logits = forward(meta.unbox(params), jnp.asarray([tokens + [0] * (64 - len(tokens))]))
        tokens.append(int(jnp.argmax(logits[0, len(tokens) - 1])))
    return tokens[len(prompt):]


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


def test_cached_greedy_matches_full_recompute_with_mixed_prompt_lengths(params):
    from flax.linen import meta

    gen = Generator(CFG, meta.unbox(params))
    batch = prompts([5, 17, 9])
    out = gen.generate(batch, max_new_tokens=12)
    for prompt, tokens in zip(batch, out):
        assert tokens == greedy_reference(params, prompt, 12)


def test_int8_cache_stays_close_to_f32(params):
    from flax.linen import meta

    batch = prompts([7, 11], seed=1)
    f32 = Generator(CFG, meta.unbox(params)).generate(batch, 10)
    int8 = Generator(CFG, meta.unbox(params), cache_dtype="int8").generate(batch, 10)
    agree = np.mean([a == b for x, y in zip(f32, int8) for a, b in zip(x, y)])
    assert agree >= 0.8  # int8 KV is lossy; greedy tokens mostly agree on this random model


def test_eos_and_per_row_max_tokens(params):
    from flax.linen import meta

    batch = prompts([6, 6, 6], seed=2)
    free = Generator(CFG, meta.unbox(params)).generate(batch, 10)
    eos = free[0][3]  # row 0's 4th token becomes EOS: it stops right after emitting it
    out = Generator(CFG, meta.unbox(params), eos_id=eos).generate(batch, [10, 4, 7])
    assert out[0] == free[0][:free[0].index(eos) + 1]
    for row, limit in ((1, 4), (2, 7)):
        expected = free[row][:limit]
        if eos in expected:
            expected = expected[:expected.index(eos) + 1]
        assert out[row] == expected


def test_new_prompts_do_not_recompile_once_warm(params):
    from flax.linen import meta

    gen = Generator(CFG, meta.unbox(params))
    gen.generate(prompts([20, 3]), 8)
    prefill, decode = gen._prefill._cache_size(), gen._decode._cache_size()
    # prompt bucket 32 and cache bucket 32 (prompt + 8 <= 32): warm shapes, new prompts
    for lengths in ([17, 24], [24, 9], [23, 1]):
        gen.generate(prompts(lengths, seed=sum(lengths)), 8)
    assert (gen._prefill._cache_size(), gen._decode._cache_size()) == (prefill, decode)


def test_chunked_streaming_gives_the_same_tokens(params):
    from flax.linen import meta

    gen = Generator(CFG, meta.unbox(params))
    batch = prompts([4, 9], seed=3)
    pieces = [[], []]
    out = gen.generate(batch, 11, SamplingParams(temperature=0.8, seed=5), chunk=3,
                       on_tokens=lambda new: [p.extend(n) for p, n in zip(pieces, new)])
    assert pieces == out
    assert out == gen.generate(batch, 11, SamplingParams(temperature=0.8, seed=5))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_cache_bytes_formula_matches_the_arrays(dtype):
    caches = init_cache(CFG, batch=3, max_len=40, dtype=dtype)
    actual = sum(x.nbytes for x in jax.tree.leaves(caches))
    assert cache_bytes(CFG, 3, 40, dtype) == actual
    # GQA: 2 kv heads instead of 4 query heads halve the cache
    mha = ModelConfig(**{**CFG.__dict__, "num_kv_heads": 4})
    assert cache_bytes(mha, 3, 40, dtype) == 2 * actual


def test_bad_requests(params):
    from flax.linen import meta

    gen = Generator(CFG, meta.unbox(params))
    with pytest.raises(UserError, match=r"prompt 0: 128 tokens, but the model's context is 128"):
        gen.generate([[1] * 128], 4)
    with pytest.raises(UserError, match=r"max_new_tokens 100: .* ask for at most 78"):
        gen.generate([[1] * 50], 100)


def test_sharded_decoding_matches_one_device(params):
    from flax.linen import meta

    from tpustack.config import MeshConfig
    from tpustack.mesh import make_mesh

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    batch = prompts([5, 12, 8, 3], seed=6)
    sharded = Generator(CFG, meta.unbox(params), cache_dtype="int8", mesh=mesh)
    state = sharded.start(batch, [10] * 4, [SamplingParams()] * 4)
    k_cache = state.caches[0][0].k_BSKH
    spec = tuple(k_cache.sharding.spec) + (None,) * (4 - len(k_cache.sharding.spec))
    assert spec == (("data", "fsdp"), None, "tensor", None)
    assert k_cache.addressable_shards[0].data.shape[0] == 1 and k_cache.addressable_shards[0].data.shape[2] == 1
    assert sharded.generate(batch, 10) == Generator(CFG, meta.unbox(params), cache_dtype="int8").generate(batch, 10)
    with pytest.raises(UserError, match=r"batch 3: not divisible by the mesh's 4 batch shards"):
        sharded.generate(batch[:3], 4)


def test_prefill_attention_in_query_blocks_equals_one_piece():
    """The prefill's causal attention runs `block` queries at a time (bounded score memory for
    large batches of long prompts); each row's result is the one-piece softmax's."""
    from tpustack.model.layers import causal_attention_in_blocks, grouped_attention

    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 64, n, 16)), jnp.float32) for n in (4, 2, 2))
    whole = grouped_attention(q, k, v, jnp.tril(jnp.ones((64, 64), dtype=bool))[None])
    blocked = causal_attention_in_blocks(q, k, v, block=16)
    np.testing.assert_allclose(np.asarray(blocked), np.asarray(whole), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(causal_attention_in_blocks(q, k[:, ::-1], v, block=16)), np.asarray(whole))


def test_prefill_of_prompts_longer_than_a_query_block_matches_the_reference(params, monkeypatch):
    """Prompts past PREFILL_QUERY_BLOCK take the blocked prefill; greedy output is unchanged."""
    import tpustack.model.layers as layers

    monkeypatch.setattr(layers, "PREFILL_QUERY_BLOCK", 16)
    gen = Generator(CFG, params)
    ps = prompts([40, 7, 33])
    got = gen.generate(ps, 6)
    for p, out in zip(ps, got):
        assert out == greedy_reference(params, p, 6)


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
def test_native_cpu_decode_kernels_give_the_xla_tokens(params, cache_dtype):
    """model.decode_kernels=auto (CPU: the native matmul for 2-8 rows and paged attention over the
    cache in place) decodes the same greedy tokens as XLA alone, batch of 3 with mixed lengths."""
    import dataclasses

    from flax.linen import meta

    from tpustack.kernels import matmul_impl, paged_attention_impl

    from tpustack.kernels import matmul_cpu

    if matmul_cpu.unavailable():
        pytest.skip(matmul_cpu.unavailable())
    assert matmul_impl(3) == "cpu" and paged_attention_impl(16, CFG.heads_dim, "float32") == "cpu"
    batch = prompts([4, 13, 9], seed=7)
    native = Generator(CFG, meta.unbox(params), cache_dtype=cache_dtype).generate(batch, 12)
    xla = Generator(dataclasses.replace(CFG, decode_kernels="xla"), meta.unbox(params),
                    cache_dtype=cache_dtype).generate(batch, 12)
    assert native == xla


def test_cache_attention_on_the_native_kernel_equals_the_einsum():
    """Several queries per row at different positions (a speculative verify) over a [B, S, K, H] cache."""
    from tpustack.infer.cache import LayerCache
    from tpustack.model.layers import cache_attention_cpu, grouped_attention

    r = np.random.default_rng(8)
    B, T, S, N, K, H = 2, 3, 40, 4, 2, 16
    q = jnp.asarray(r.normal(size=(B, T, N, H)), jnp.float32)
    cache = LayerCache(*(jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32) for _ in range(2)))
    positions = jnp.array([[5, 6, 7], [30, 31, 32]])
    mask = jnp.arange(S)[None, None, :] <= positions[:, :, None]
    want = grouped_attention(q, cache.k_BSKH, cache.v_BSKH, mask)
    np.testing.assert_allclose(jax.jit(cache_attention_cpu)(q, cache, positions), want, rtol=2e-5, atol=2e-5)
