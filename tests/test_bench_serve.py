"""`tpustack bench serve` and its pieces: vLLM's definitions on hand-made records, the
clients' send times, the seeded lognormal workload, and the command end to end on a tiny
HF directory (engine, static batches and transformers agree token for token)."""

import json
import math

import jax
import numpy as np
import pytest

from tests.test_server import CFG
from tpustack.cli import main
from tpustack.infer.loadgen import Clients, Record, Workload, make_workload, summarize
from tpustack.weights import init_weights


def test_summarize_follows_vllms_definitions():
    records = [Record(0, 10, sent=0.0, times=[1.0, 1.5, 2.5], n_out=3),
               Record(1, 20, sent=0.1, times=[0.2], n_out=1),
               Record(2, 5, sent=0.0, error="HTTP 500")]
    s = summarize(records, slo_ttft_ms=500)
    assert (s["completed"], s["errors"], s["duration_s"]) == (2, 1, 2.5)
    assert s["ttft"]["mean_ms"] == pytest.approx((1000 + 100) / 2) and s["ttft"]["p50_ms"] == pytest.approx(550)
    assert s["tpot"]["mean_ms"] == pytest.approx(750)  # (2.5 - 1.0) / (3 - 1); one-token requests have none
    assert s["itl"]["mean_ms"] == pytest.approx(750) and s["itl"]["p99_ms"] == pytest.approx(995)  # 500, 1000
    assert s["e2e"]["p50_ms"] == pytest.approx((2500 + 100) / 2)
    assert s["request_throughput"] == pytest.approx(2 / 2.5) and s["output_throughput"] == pytest.approx(4 / 2.5)
    assert s["goodput"] == pytest.approx(1 / 2.5)  # only the second met the 500 ms TTFT bound


def test_clients_send_at_arrival_or_when_a_client_is_free():
    workload = Workload([[1]] * 4, [1] * 4, arrivals=[0.0, 0.1, 0.2, 5.0])
    clients = Clients(workload, concurrency=2)
    assert clients.send() == (0, 0.0) and clients.send() == (1, 0.1)
    assert clients.send_time() is None  # both clients wait for their answers
    clients.done(1.0)
    assert clients.send() == (2, 1.0)  # arrived at 0.2, sent when a client came free
    clients.done(0.5)
    assert clients.send() == (3, 5.0) and clients.left() == 0 and clients.send_time() is None
    open_loop = Clients(workload)
    assert [open_loop.send()[1] for _ in range(4)] == workload.arrivals


def test_workload_is_seeded_lognormal_and_fits_the_context():
    a = make_workload(4000, 100, 512, seed=3, prompt_mean=64, output_mean=40, sigma=0.5, output_range=(1, 400),
                      rate=8.0, shared_prefix=5)
    assert a == make_workload(4000, 100, 512, seed=3, prompt_mean=64, output_mean=40, sigma=0.5,
                              output_range=(1, 400), rate=8.0, shared_prefix=5)
    assert np.mean(a.max_tokens) == pytest.approx(40, rel=0.05)
    assert np.mean([len(p) for p in a.prompts]) == pytest.approx(64 + 5, rel=0.05)
    assert np.mean(np.diff(a.arrivals)) == pytest.approx(1 / 8, rel=0.05)
    assert all(len(p) + m <= 512 and p[:5] == a.prompts[0][:5] for p, m in zip(a.prompts, a.max_tokens))
    fixed = make_workload(8, 100, 64, prompt_mean=100, output_mean=10, sigma=0.0, output_range=(10, 10))
    assert fixed.max_tokens == [10] * 8 and {len(p) for p in fixed.prompts} == {54} and fixed.arrivals == [0.0] * 8
    again = a.with_new_tokens(1, 100)
    assert [len(p) for p in again.prompts] == [len(p) for p in a.prompts] and again.prompts != a.prompts


def test_bench_serve_engine_static_and_hf_agree(tmp_path, capsys):
    from tpustack.interop.hf import save_hf_checkpoint

    save_hf_checkpoint(str(tmp_path / "hf"), jax.device_get(init_weights(CFG).params), CFG)
    out = tmp_path / "serve.json"
    rc = main(["bench", "serve", "--checkpoint", str(tmp_path / "hf"), "--num-prompts", "4", "--prompt-len", "12",
               "--output-len", "8", "--min-output", "2", "--max-output", "16", "--concurrency", "4", "--max-seqs", "4",
               "--token-budget", "16", "--static", "--peer", "hf", "--warmup", "0", "--slo-ttft", "1e6",
               "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    report = json.loads(out.read_text())
    want = report["workload"]["output_tokens"]
    for mode in ("engine", "static", "hf"):
        r = report["results"][mode]
        assert (r["completed"], r["errors"], r["output_tokens"]) == (4, 0, want), mode
        assert r["goodput"] == pytest.approx(r["request_throughput"]) and r["ttft"]["p99_ms"] > 0
        assert math.isfinite(r["tpot"]["p50_ms"])
    assert report["agreement"]["engine_vs_static"]["all_equal"] == 1.0  # token for token
    assert report["agreement"]["engine_vs_hf"]["all_equal"] == 1.0
    assert report["extras"]["engine"]["pages_in_use_after"] == 0
    assert "TPOT p50 ms" in printed and "greedy agreement engine_vs_static: first token 100.0%" in printed
    # each mode's figures print as it ends (the JSON is rewritten then too), in the order run
    assert report["modes"] == ["engine", "static", "hf"]
    assert printed.index("[engine done]") < printed.index("[static done]") < printed.index("[hf done]")


def test_bench_serve_bad_flags_are_one_line_errors(capsys):
    assert main(["bench", "serve", "--url", "http://127.0.0.1:9", "--static"]) == 2
    assert "--static/--peer with --url: give --checkpoint" in capsys.readouterr().err
    assert main(["bench", "serve", "--rate", "0"]) == 2
    assert "--rate 0.0: must be > 0" in capsys.readouterr().err
    assert main(["bench", "serve", "--modes", "engine,peer"]) == 2
    assert "--modes 'engine,peer': give a comma list of engine, server, static, hf" in capsys.readouterr().err


def test_one_warm_up_pass_compiles_every_shape_the_timed_pass_needs():
    """bench serve's warm-up: the same workload with other tokens, then nothing compiles (the
    engine's pages start committed to a device, as its step's outputs are: uncommitted, its
    first shape compiled twice). A config of its own, so no other test has warmed its step."""
    import dataclasses

    from tpustack.infer.engine import Engine, EngineConfig
    from tpustack.infer.load_drivers import run_engine

    cfg = dataclasses.replace(CFG, max_seq_len=96)
    engine = Engine(cfg, init_weights(cfg).params, EngineConfig(page_size=8, num_pages=64, max_seqs=4,
                                                                token_budget=32), eos_id=-1)
    # one at a time: only the first request prefills the shared prefix too (28 tokens: the 32-token
    # shape, in no other step); the rest hit the cache and prefill 12 (the 16-token shape); decoding
    # runs the 1-token shape
    workload = make_workload(6, cfg.vocab_size, cfg.max_seq_len, seed=4, prompt_mean=12, output_mean=6, sigma=0.0,
                             output_range=(6, 6), shared_prefix=16)
    _, warm = run_engine(engine, workload.with_new_tokens(1, cfg.vocab_size), concurrency=1)
    assert warm["compiled_shapes_during_run"] == 3 and warm["prefix_cache_hit_rate"] > 0.5
    records, timed = run_engine(engine, workload, concurrency=1)
    assert timed["compiled_shapes_during_run"] == 0 and timed["pages_in_use_after"] == 0
    assert [r.n_out for r in records] == workload.max_tokens
