"""The edge-cloud router against a real `tpustack serve` app: confident prompts get the local
model's own greedy answer, the rest the server's, the confidence equals a plain numpy
computation, and `tpustack route` does the same over HTTP."""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta
from starlette.testclient import TestClient

from tpustack.config import ModelConfig
from tpustack.data import ByteTokenizer
from tpustack.infer.decode import Generator
from tpustack.infer.engine import Engine, EngineConfig
from tpustack.infer.router import Cloud, LocalModel, RouteConfig, Router, confidence
from tpustack.infer.runner import Runner
from tpustack.infer.server import Server, ServerConfig, create_app
from tpustack.model import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIG = ModelConfig(vocab_size=258, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=128, init_std=0.3)
SMALL = ModelConfig(vocab_size=258, d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, ffn_dim=64,
                    max_seq_len=128, init_std=0.5)
KEY = "sk-router"
TOK = ByteTokenizer()
PROMPTS = ["def main():\n", "import os", "The quick brown fox", "for i in range(", "héllo wörld 🎉",
           "class A:", "x = [1, 2, 3]", "# a comment\n"]
RCFG = dict(probe_tokens=4, max_tokens=12)


def _params(cfg, seed):
    return meta.unbox(Decoder(cfg).init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32))["params"])


@pytest.fixture(scope="module")
def big_params():
    return _params(BIG, 1)


@pytest.fixture
def app(big_params):  # per test: an app's shutdown stops its runner
    engine = Engine(BIG, big_params, EngineConfig(page_size=8, num_pages=64, max_seqs=8, token_budget=64,
                                                   token_buckets=(64,), seq_buckets=(8,)),
                    eos_id=-1, detokenize=TOK.decode)
    return create_app(Server(Runner(engine), TOK, ServerConfig(model_name="big", api_key=KEY)))


@pytest.fixture(scope="module")
def local():
    return LocalModel(SMALL, _params(SMALL, 2), TOK)


def test_router_answers_locally_exactly_when_confident_else_with_the_servers_answer(app, big_params, local):
    big = Generator(BIG, big_params, eos_id=-1)
    straight_local = Generator(SMALL, local.params, eos_id=TOK.eos_id)
    with TestClient(app) as client:
        cloud = Cloud("http://testserver/v1", "big", KEY, client=client)
        for measure in ("max_prob", "entropy"):
            probe_router = Router(local, cloud, RouteConfig(0.0, measure, **RCFG))
            confs = [probe_router.probe(p)[2] for p in PROMPTS]
            assert len(set(np.round(confs, 6))) == len(PROMPTS)  # the prompts differ in confidence
            middle = float(np.median(confs))
            router = Router(local, cloud, RouteConfig(middle, measure, **RCFG))
            for prompt, conf in zip(PROMPTS, confs):
                routed = router.route(prompt)
                ids = TOK.encode(prompt).tolist()
                assert routed.confidence == pytest.approx(conf, abs=1e-6)
                assert routed.where == ("local" if conf >= middle else "cloud")
                if routed.where == "local":  # probe + continuation = one straight greedy decode
                    out = straight_local.generate([ids], RCFG["max_tokens"])[0]
                    assert routed.text == TOK.decode(out[:out.index(TOK.eos_id)] if TOK.eos_id in out else out)
                else:
                    assert routed.text == TOK.decode(big.generate([ids], RCFG["max_tokens"])[0])
                assert 0 < routed.probe_s <= routed.latency_s
            wheres = {router.route(p).where for p in PROMPTS}
            assert wheres == {"local", "cloud"}


def test_confidence_is_the_mean_max_probability_or_entropy_of_the_probe(local):
    router = Router(local, Cloud("http://unused/v1"), RouteConfig(0.5, "max_prob", **RCFG))
    ids, probe, conf = router.probe("def main():\n")
    assert len(probe) == RCFG["probe_tokens"]
    tokens = jnp.asarray([ids + probe], jnp.int32)
    logits = np.asarray(Decoder(SMALL).apply({"params": local.params}, tokens), np.float64)[0]
    rows = logits[len(ids) - 1:len(ids) + len(probe) - 1]
    p = np.exp(rows - rows.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert list(p.argmax(-1)) == probe  # greedy: each probe token is its distribution's argmax
    assert conf == pytest.approx(p.max(-1).mean(), abs=1e-5)
    assert confidence(np.log(p), "entropy") == pytest.approx((p * np.log(p)).sum(-1).mean(), abs=1e-5)
    uniform = np.full((3, 258), -np.log(258))
    assert confidence(uniform, "entropy") == pytest.approx(-np.log(258)) and confidence(uniform, "max_prob") == \
        pytest.approx(1 / 258)


def test_route_command_forwards_unsure_prompts_to_a_running_server(app, big_params, local, tmp_path):
    import uvicorn

    from tpustack.export import export_hf
    from tpustack.weights import Weights

    export_hf(Weights(SMALL, local.params, TOK), str(tmp_path / "small"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        # max_prob never exceeds 1: threshold 1.01 sends everything to the server
        result = subprocess.run([sys.executable, "-m", "tpustack", "route", "--checkpoint", str(tmp_path / "small"),
                                 "--cloud", f"http://127.0.0.1:{port}/v1", "--api-key", KEY, "--threshold", "1.01",
                                 "--max-tokens", "12", "--probe-tokens", "4", "--json", "--prompt", PROMPTS[0],
                                 "--prompt", PROMPTS[4]], cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        server.should_exit = True
        thread.join(30)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    big = Generator(BIG, big_params, eos_id=-1)
    assert [r["where"] for r in lines] == ["cloud", "cloud"]
    for line, prompt in zip(lines, (PROMPTS[0], PROMPTS[4])):
        assert line["text"] == TOK.decode(big.generate([TOK.encode(prompt).tolist()], 12)[0])
    bad = subprocess.run([sys.executable, "-m", "tpustack", "route", "--checkpoint", str(tmp_path / "small"),
                          "--cloud", "http://127.0.0.1:9/v1", "--threshold", "0.5", "--measure", "vibes",
                          "--prompt", "x"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--measure 'vibes'" in bad.stderr
