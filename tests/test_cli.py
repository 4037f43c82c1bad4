"""The `tpustack` command: the main job at test size, user errors, preemption, kill -9."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import TINY_OVERRIDES
from tb_events import scalar_tags
from tpustack.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()]


def tpustack(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


class Running:
    """A `tpustack train` process whose stderr is collected by a thread."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "tpustack", "train", *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.err: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        while chunk := self.proc.stderr.read(64):
            self.err.append(chunk)

    def wait_for(self, predicate, timeout=180):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {''.join(self.err)[-2000:]}")
            time.sleep(0.1)
        self.proc.kill()
        raise AssertionError(f"timed out: {''.join(self.err)[-2000:]}")


@pytest.mark.slow
def test_main_job_smoke_then_eval_and_sample(tmp_path):
    workdir = str(tmp_path / "run")
    result = tpustack("train", "--config", "configs/tiny.py", *SMALL, "--config.train.steps=6",
                      "--config.train.sample_len=12", "--workdir", workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out loss" in result.stdout and "----- sample (prompt 'def ')" in result.stdout
    tags = scalar_tags(os.path.join(workdir, "tb"))
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second", "train/step_time_s",
                "train/mfu", "train/loss_scale", "eval/loss", "eval/perplexity"):
        assert tag in tags, f"{tag} missing from TensorBoard: {sorted(tags)}"
    assert 0 < tags["train/mfu"][-1] < 1 and tags["train/loss"][-1] < tags["train/loss"][0]
    assert Checkpointer(workdir).latest_step() == 6
    ev = tpustack("eval", "--workdir", workdir)
    assert ev.returncode == 0 and "held-out loss" in ev.stdout, ev.stderr[-2000:]
    smp = tpustack("sample", "--checkpoint", workdir, "--prompt", "import", "--max-new-tokens", "5")
    assert smp.returncode == 0 and smp.stdout.startswith("import"), smp.stderr[-2000:]
    # `sample` is `generate`: one code path, the same defaults, the same tokens
    runs = [tpustack(cmd, "--checkpoint", workdir, "--prompt", "import", "--prompt", "def ", "--max-new-tokens",
                     "5", "--temperature", "0.8", "--json") for cmd in ("sample", "generate")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.count('"ids"') == 2


@pytest.mark.parametrize("args,message", [
    (["train", "--config.model.num_layer=2"], "unknown key 'num_layer' in config.model"),
    (["train", "--config.train.steps=ten"], "--config.train.steps='ten': expected a int"),
    (["train", "--config", "missing.py"], "--config: no such file 'missing.py'"),
    (["train", "--config.mesh.data=3"], "config.mesh: data=3 x stage=1 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"),
    (["sample", "--checkpoint", "/nonexistent", "--prompt-ids", "1"], "--checkpoint '/nonexistent': neither a tpustack workdir"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["serve", "--checkpoint", "/nonexistent"], "--checkpoint '/nonexistent': neither a tpustack workdir"),
    (["export", "--checkpoint", "/nonexistent", "--format", "onnx", "--out", "x"], "--format 'onnx': one of hf, gguf, orbax"),
])
def test_user_errors_exit_2_with_one_line(args, message, tmp_path):
    if args[0] == "train":  # the test's overrides first, so the bad value under test wins
        args = ["train", *SMALL, "--workdir", str(tmp_path), *args[1:]]
    if "--config.mesh.data=3" in args:
        args = args + ["--config.mesh.fsdp=1"]
    result = tpustack(*args, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_sigterm_saves_current_step_and_resume_continues(tmp_path):
    workdir = str(tmp_path / "run")
    run = Running("--config", "configs/tiny.py", *SMALL, "--config.train.steps=100000",
                  "--config.checkpoint.every=0", "--config.train.log_every=1", "--workdir", workdir)
    run.wait_for(lambda: "loss=" in "".join(run.err))
    run.proc.send_signal(signal.SIGTERM)
    run.proc.wait(timeout=120)
    run._thread.join(timeout=10)  # the reader owns stderr; stdout holds a few lines only
    out = run.proc.stdout.read()
    assert run.proc.returncode == 0, "".join(run.err)[-2000:]
    assert "preempted: checkpoint saved at step" in out
    saved = Checkpointer(workdir).latest_step()
    assert saved is not None and saved >= 1 and f"step {saved}" in out
    resumed = tpustack("train", "--config", "configs/tiny.py", *SMALL, f"--config.train.steps={saved + 2}",
                       "--no-samples", "--workdir", workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"steps {saved}->{saved + 2}" in resumed.stdout
    assert Checkpointer(workdir).latest_step() == saved + 2


def latest_step(workdir: str) -> int:
    """The step restore would pick. Read-only: a writable manager would clean up the trainer's
    in-flight temporary dirs. Retried: the trainer may delete an old step (keep=K) while we list."""
    for _ in range(50):
        try:
            return Checkpointer(workdir, read_only=True).latest_step() or 0
        except FileNotFoundError:
            time.sleep(0.05)
    raise AssertionError(f"could not list {workdir}")


@pytest.mark.slow
def test_kill_9_during_saves_never_leaves_a_checkpoint_restore_would_pick(tmp_path):
    from tpustack.train.loop import load_trained

    workdir = str(tmp_path / "run")
    ckpt_dir = os.path.join(workdir, "checkpoints")
    for attempt, delay in enumerate((0.0, 0.35, 0.7)):
        run = Running("--config", "configs/tiny.py", *SMALL, "--config.train.steps=100000",
                      "--config.checkpoint.every=1", "--config.checkpoint.keep=2", "--workdir", workdir)
        latest = lambda: latest_step(workdir)  # noqa: E731
        before = latest()
        run.wait_for(lambda: latest() >= before + 2)
        time.sleep(delay)  # land the kill at different points of the save cycle
        run.proc.kill()
        run.proc.wait()
        _, _, state = load_trained(workdir)
        assert int(state.step) == latest() >= before + 2
    # a step directory that was never finalised (as a kill mid-write leaves it) is ignored
    last = latest()
    partial = os.path.join(ckpt_dir, f"{last + 1}.orbax-checkpoint-tmp-1234567890")
    os.makedirs(os.path.join(partial, "state"))
    assert latest() == last


def _bpe_tokenizer(path) -> None:
    """A small byte-level BPE tokenizer.json (300 tokens, <s> and </s>), trained on the fly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([f"def f{i}(x):\n    return x + {i}\n" for i in range(200)], trainer)
    tok.save(str(path))


@pytest.mark.slow
def test_export_hf_from_a_workdir_gives_its_logits_and_tokenizer(tmp_path):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tpustack.model import Decoder
    from tpustack.weights import load_weights

    _bpe_tokenizer(tmp_path / "tokenizer.json")
    workdir, out = str(tmp_path / "run"), str(tmp_path / "hf")
    trained = tpustack("train", "--config", "configs/tiny.py", *SMALL, "--config.train.steps=3", "--no-samples",
                       f"--config.data.tokenizer={tmp_path / 'tokenizer.json'}", "--workdir", workdir)
    assert trained.returncode == 0, trained.stderr[-3000:]
    exported = tpustack("export", "--checkpoint", workdir, "--format", "hf", "--out", out)
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert exported.stdout.split() == [os.path.join(out, f) for f in (
        "config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja")]  # the tokenizer came without a config or template: both are written
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    (cfg_a, params_a, tok_a), (cfg_b, params_b, tok_b) = load_weights(workdir), load_weights(out)
    assert cfg_a == cfg_b
    ids = tok_a.encode("def f7(x):\n    return x + 7\n")
    from transformers import AutoTokenizer
    auto = AutoTokenizer.from_pretrained(out)  # from the written tokenizer_config.json and template
    assert auto("def f7(x):\n    return x + 7\n", add_special_tokens=False)["input_ids"] == ids.tolist()
    assert auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<|user|>\nhi\n"
    np.testing.assert_array_equal(tok_b.encode("def f7(x):\n    return x + 7\n"), ids)
    tokens = jnp.asarray(np.stack([ids, ids[::-1]]))
    logits_a, logits_b = (Decoder(cfg_a).apply({"params": p}, tokens) for p in (params_a, params_b))
    np.testing.assert_array_equal(jax.device_get(logits_a), jax.device_get(logits_b))
    again = tpustack("export", "--checkpoint", workdir, "--format", "hf", "--out", out, timeout=120)
    assert again.returncode == 2 and "exists and is not empty" in again.stderr, again.stderr[-2000:]
