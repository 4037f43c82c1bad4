"""The serving engine's step, with the Pallas paged attention, compiles for TPU (v5e, v6e).

Needs libtpu; skips cleanly without it. One virtual chip of each topology: the step sits
in a one-device shard_map, since Mosaic lowers only where it sees TPU devices.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from helpers import require_libtpu  # noqa: E402
from tpustack.config import ModelConfig  # noqa: E402
from tpustack.infer.paged import init_pages, paged_step, pages_bytes  # noqa: E402
from tpustack.kernels import aot  # noqa: E402
from tpustack.model.transformer import Decoder, abstract_params  # noqa: E402
from tpustack.plan.memory import kv_cache_bytes  # noqa: E402

require_libtpu()

# head dim 128: the TPU paged kernel reads (L, H) tiles in place
CFG = ModelConfig(vocab_size=512, d_model=256, num_layers=2, num_heads=2, num_kv_heads=1, ffn_dim=512,
                  max_seq_len=256)
PAGES, PAGE_SIZE, TOKENS, SEQS = 64, 16, 64, 16


@pytest.mark.parametrize("generation", ["v5e", "v6e"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_step_compiles_for_tpu(generation, dtype):
    mesh = Mesh(np.array(aot.topology(aot.TOPOLOGIES[generation]).devices)[:1], ("x",))
    one = NamedSharding(mesh, P())
    sds = lambda shape, dt: jax.ShapeDtypeStruct(shape, dt, sharding=one)  # noqa: E731
    params = jax.tree.map(lambda a: sds(a.shape, a.dtype), meta.unbox(abstract_params(CFG)))
    pages = jax.tree.map(lambda a: sds(a.shape, a.dtype),
                         jax.eval_shape(lambda: init_pages(CFG, PAGES, PAGE_SIZE, dtype)))
    i32 = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
    sampling = {"temperature": sds((SEQS,), jnp.float32), "top_k": i32(SEQS), "top_p": sds((SEQS,), jnp.float32),
                "seed": sds((SEQS,), jnp.uint32)}
    model = Decoder(CFG)
    step = jax.shard_map(lambda params, pages, *a: paged_step(model, {"params": params}, pages, *a, impl="pallas",
                                                              interpret=False),
                         mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    compiled = jax.jit(step, donate_argnums=(1,)).lower(
        params, pages, i32(TOKENS), i32(TOKENS), i32(TOKENS), i32(SEQS + 1, CFG.max_seq_len // PAGE_SIZE),
        i32(SEQS), sampling).compile()
    assert "tpu_custom_call" in compiled.as_text()  # the Pallas kernel, not the XLA fallback
    pool = pages_bytes(CFG, PAGES, PAGE_SIZE, dtype)
    # the pool per chip is what `tpustack estimate` counts for a cache of PAGES * PAGE_SIZE tokens
    assert pool == kv_cache_bytes(CFG, context=PAGES * PAGE_SIZE, batch=1, kv_dtype=dtype)
    out = compiled.memory_analysis().output_size_in_bytes  # new pages + next tokens and logprobs (tile-padded)
    assert pool + SEQS * 8 <= out <= pool + 8192
