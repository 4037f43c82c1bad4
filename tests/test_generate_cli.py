"""`tpustack generate` and `tpustack bench decode`: output, speculative, and one-line errors."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax.linen import meta

from tpustack.config import ModelConfig
from tpustack.interop.hf import save_hf_checkpoint
from tpustack.model import Decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig(vocab_size=96, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, ffn_dim=128,
                  max_seq_len=64, init_std=0.3)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """HF-format target and draft directories (no tokenizer: ids in, ids out)."""
    root = tmp_path_factory.mktemp("ckpt")
    paths = {}
    for name, cfg in {"target": CFG, "draft": dataclasses.replace(CFG, num_layers=1),
                      "other_vocab": dataclasses.replace(CFG, vocab_size=128)}.items():
        params = meta.unbox(Decoder(cfg).init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))["params"])
        save_hf_checkpoint(str(root / name), jax.device_get(params), cfg)
        paths[name] = str(root / name)
    return paths


def tpustack(*args):
    return subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_generate_json_plain_and_speculative_agree(checkpoints):
    base = ["generate", "--checkpoint", checkpoints["target"], "--prompt-ids", "5,6,7,8", "--max-new-tokens",
            "12", "--json"]
    plain = tpustack(*base)
    assert plain.returncode == 0, plain.stderr[-2000:]
    spec = tpustack(*base, "--draft", checkpoints["draft"], "--speculate-k", "3")
    assert spec.returncode == 0, spec.stderr[-2000:]
    a, b = json.loads(plain.stdout.splitlines()[-1]), json.loads(spec.stdout.splitlines()[-1])
    assert a["prompt_ids"] == [5, 6, 7, 8] and len(a["ids"]) == 12
    assert a["ids"] == b["ids"]  # greedy speculative decoding changes nothing but the speed


@pytest.mark.slow
def test_bench_decode_reports_ttft_tpot_and_cost(checkpoints):
    result = tpustack("bench", "decode", "--checkpoint", checkpoints["target"], "--prompt-len", "16",
                      "--new-tokens", "16", "--repeats", "1", "--price-per-hour", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "TTFT" in result.stdout and "TPOT" in result.stdout and "per million output tokens" in result.stdout


@pytest.mark.slow
def test_bench_decode_with_a_draft_times_plain_and_speculative_side_by_side(checkpoints, tmp_path):
    out = tmp_path / "spec.json"
    result = tpustack("bench", "decode", "--checkpoint", checkpoints["target"], "--draft", checkpoints["draft"],
                      "--speculate-k", "3", "--prompt-len", "16", "--new-tokens", "16", "--repeats", "1",
                      "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["identical_tokens"] is True and report["speedup"] > 0
    assert 0 <= report["speculative"]["acceptance_rate"] <= 1 and report["plain"]["new_tokens"] == 16
    assert "outputs identical: True" in result.stdout


@pytest.mark.parametrize("extra,message", [
    (["--prompt-ids", ",".join(["1"] * 64)], "prompt 0: 64 tokens, but the model's context is 64"),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "100"], "max_new_tokens 100: with a 3-token prompt"),
    (["--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--temperature", "1", "--top-p", "1.5"], "--top-p 1.5: must be in (0, 1]"),
    (["--prompt-ids", "1,2,x"], "--prompt-ids '1,2,x': expected comma-separated integers"),
    (["--prompt", "hello"], "has no tokenizer; pass --prompt-ids instead"),
    (["--prompt-ids", "1,2", "--draft", "OTHER"], "the draft's vocabulary has 128 tokens, the target's 96"),
])
def test_bad_requests_are_one_line_errors(checkpoints, extra, message):
    extra = [checkpoints["other_vocab"] if x == "OTHER" else x for x in extra]
    result = tpustack("generate", "--checkpoint", checkpoints["target"], *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
