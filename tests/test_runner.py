"""The engine on its thread: concurrent submits, cancel frees pages at once, shutdown."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from tpustack.config import ModelConfig
from tpustack.errors import UserError
from tpustack.infer.engine import Engine, EngineConfig
from tpustack.infer.runner import Runner
from tpustack.model import Decoder

CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=128, init_std=0.3)
ECFG = EngineConfig(page_size=8, num_pages=128, max_seqs=16, token_budget=64, chunk_size=16,
                    token_buckets=(64,), seq_buckets=(16,))


@pytest.fixture(scope="module")
def params():
    return meta.unbox(Decoder(CFG).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])


def workload(n, seed):
    rng = np.random.default_rng(seed)
    return ([rng.integers(0, CFG.vocab_size, int(k)).tolist() for k in rng.integers(1, 40, n)],
            [int(m) for m in rng.integers(1, 30, n)])


def test_concurrent_submits_match_the_engine_alone(params):
    prompts, outs = workload(16, seed=0)
    expected = Engine(CFG, params, ECFG).generate(prompts, outs)
    runner = Runner(Engine(CFG, params, ECFG))
    got = [None] * len(prompts)

    def client(i):
        got[i] = list(runner.submit(prompts[i], outs[i]).tokens(timeout=120))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected
    runner.shutdown()
    assert runner.engine.pool.in_use() == 0 and runner.error is None


def test_cancel_frees_pages_before_the_next_step(params):
    runner = Runner(Engine(CFG, params, ECFG))
    handle = runner.submit(list(range(1, 30)), 90)
    first = handle.outputs.get(timeout=120)
    assert first.token is not None and runner.engine.pool.in_use() > 0
    handle.cancel()
    while (out := handle.outputs.get(timeout=120)).finish_reason is None:
        pass
    assert out.finish_reason == "cancelled"
    assert runner.engine.pool.in_use() == 0  # freed before the cancellation was reported
    runner.shutdown()
    assert len(handle.request.output) < 90 and not runner.engine.requests  # finished records dropped


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_drains_or_cancels_and_refuses_new_work(params, drain):
    runner = Runner(Engine(CFG, params, ECFG))
    prompts, outs = workload(6, seed=1)
    handles = [runner.submit(p, 60 if not drain else m) for p, m in zip(prompts, outs)]
    runner.shutdown(drain=drain, timeout=120)
    assert not runner._thread.is_alive()
    for h, m in zip(handles, outs):
        req = h.request
        if drain:
            assert req.finish_reason == "length" and len(req.output) == m
        else:
            assert req.finish_reason in ("cancelled", "length")
    if not drain:
        assert any(h.request.finish_reason == "cancelled" for h in handles)
    assert runner.engine.pool.in_use() == 0
    with pytest.raises(UserError, match="shutting down"):
        runner.submit([1, 2], 3)


def test_bad_request_raises_in_the_caller(params):
    runner = Runner(Engine(CFG, params, ECFG))
    with pytest.raises(UserError, match="prompt: is empty"):
        runner.submit([], 4)
    assert list(runner.submit([5, 6], 3).tokens(timeout=120))  # the runner is still serving
    runner.shutdown()
