"""gs:// workdirs end to end, against the local Cloud Storage emulator (tests/gcs.py): train and
resume bit for bit, SIGTERM and resume (bit-identical to the same round trip on a local
workdir), eval / generate / export from the bucket, TensorBoard events in the bucket, and two
processes sharing one gs:// workdir. Data and tokenizers read from gs:// are tests/test_gcs_data.py's.

Every single-process run trains the same tiny model to the same final step; its learning
rate is constant after warm-up (min_lr_ratio=1), so a run stopped early and continued with
more steps has the schedule of the straight run, and every final state must equal the
straight local run's. The two-process test trains tests/test_preemption.py's model and has a
straight two-process run of its own as the reference.
"""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gcs import new_bucket
from helpers import TINY_OVERRIDES
from test_preemption import finish, start
from tpustack import paths
from tpustack.checkpoint import Checkpointer
from tpustack.model import Decoder
from tpustack.weights import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 16
TRAIN = ["train", "--config", "configs/tiny.py", *[f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()],
         "--config.train.min_lr_ratio=1.0", "--config.train.warmup_steps=2", "--config.train.log_every=1",
         "--config.checkpoint.every=4", "--no-samples"]
TOKENS = np.random.default_rng(0).integers(0, 256, (2, 12)).astype(np.int32)


def tpustack(*args, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[:3]} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result


def train(workdir: str, steps: int = STEPS) -> str:
    return tpustack(*TRAIN, f"--config.train.steps={steps}", "--workdir", workdir).stdout


def latest(workdir: str) -> int:
    return Checkpointer(workdir, read_only=True).latest_step() or 0


def host_params(path: str):
    return jax.device_get(load_weights(path).params)


def logits(path: str) -> np.ndarray:
    cfg, params, _ = load_weights(path)
    return np.asarray(Decoder(cfg).apply({"params": params}, jnp.asarray(TOKENS)))


def assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The straight local run to STEPS: (workdir, params)."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    train(workdir)
    assert latest(workdir) == STEPS
    return workdir, host_params(workdir)


@pytest.fixture(scope="module")
def resumed(gcs_emulator):
    """gs://<fresh bucket>/run trained 4 steps, then rerun to STEPS: (workdir, stdout of the rerun).

    Between the runs this process lists the workdir (a reader, or another host): it must see
    the rerun's steps afterwards, which gcsfs's per-process listings cache would hide."""
    workdir = paths.join(new_bucket(gcs_emulator), "run")
    train(workdir, 4)
    assert latest(workdir) == 4 and paths.isdir(paths.join(workdir, "checkpoints", "4"))
    out = train(workdir)
    assert latest(workdir) == STEPS and paths.isfile(paths.join(workdir, "checkpoints", str(STEPS),
                                                                "_CHECKPOINT_METADATA"))
    return workdir, out


@pytest.mark.slow
def test_train_into_gs_then_rerun_resumes_bit_for_bit(resumed, reference):
    workdir, out = resumed
    assert f"steps 4->{STEPS}, workdir {workdir}" in out
    assert_same_params(host_params(workdir), reference[1])


def train_until_sigterm(workdir: str) -> str:
    """Train to STEPS, SIGTERM as soon as the loop starts (the run stops after step 1, or a
    few steps later if the signal is slow to arrive); the run's output."""
    proc = subprocess.Popen([sys.executable, "-m", "tpustack", *TRAIN, f"--config.train.steps={STEPS}",
                             "--workdir", workdir], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, sent = [], False
    for line in proc.stdout:  # tqdm's "\r" updates count as lines too
        if not sent and f"->{STEPS}, workdir {workdir}" in line:
            proc.send_signal(signal.SIGTERM)
            sent = True
        lines.append(line)
    out = "".join(lines)
    assert proc.wait(timeout=60) == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_sigterm_then_resume_on_gs_is_bit_identical_to_local(gcs_bucket, tmp_path, reference):
    finals, stops = {}, {}
    for kind, workdir in (("gs", paths.join(gcs_bucket, "run")), ("local", str(tmp_path / "run"))):
        out = train_until_sigterm(workdir)
        assert "preempted: checkpoint saved at step" in out, out
        stops[kind] = int(out.split("SIGTERM: saving step ")[1].split()[0])
        assert 1 <= stops[kind] < STEPS and latest(workdir) == stops[kind]
        assert f"steps {stops[kind]}->{STEPS}" in train(workdir)
        finals[kind] = host_params(workdir)
    assert_same_params(finals["gs"], finals["local"])
    assert_same_params(finals["gs"], reference[1])


@pytest.mark.slow
def test_eval_generate_and_export_from_gs(resumed, reference, gcs_bucket):
    from tpustack.evaluate import heldout_loss

    workdir = resumed[0]
    # the params are the local run's, so is the held-out loss on the same data
    out = tpustack("eval", "--workdir", workdir).stdout
    assert f"held-out loss {heldout_loss(reference[0])[1]:.4f} nats/token" in out, out
    # export to another bucket, then load it back from there through the one loader
    hf = paths.join(gcs_bucket, "export", "hf")
    listed = tpustack("export", "--checkpoint", workdir, "--format", "hf", "--out", hf).stdout.split()
    assert listed == [paths.join(hf, f) for f in ("config.json", "model.safetensors", "generation_config.json",
                                                  "tokenizer.json", "tokenizer_config.json")]  # byte tokenizer
    assert json.loads(paths.read_text(listed[0]))["num_hidden_layers"] == 2
    cfg, params, tok = load_weights(hf)
    assert tok.encode("héllo").tolist() == list("héllo".encode()) and not cfg.scan_layers
    assert_same_params(jax.device_get(params), reference[1])
    np.testing.assert_array_equal(logits(hf), logits(reference[0]))
    # generate from the gs:// workdir and from the gs:// export: the same tokens and text (the
    # byte tokenizer travels as a tokenizer.json)
    gen = ["--prompt-ids", "100,101,102", "--max-new-tokens", "6", "--temperature", "0.8", "--json"]
    outs = [json.loads(tpustack("generate", "--checkpoint", c, *gen).stdout.splitlines()[-1]) for c in (workdir, hf)]
    assert outs[0]["ids"] == outs[1]["ids"] and len(outs[0]["ids"]) == 6
    assert outs[0]["text"] is not None and outs[1]["text"] == outs[0]["text"]


@pytest.mark.slow
def test_training_writes_tensorboard_events_to_the_bucket(resumed, tmp_path):
    from tb_events import scalar_tags

    events = paths.glob(paths.join(resumed[0], "tb", "events.out.tfevents.*"))
    assert len(events) == 2  # one per run: the first 4 steps and the rerun
    (tmp_path / "tb").mkdir()
    for i, event in enumerate(events):
        (tmp_path / "tb" / f"events.out.tfevents.{i}").write_bytes(paths.read_bytes(event))
    tags = scalar_tags(str(tmp_path / "tb"))
    assert len(tags["train/loss"]) == STEPS  # log_every=1: steps 1..4, then 5..STEPS
    assert len(tags["eval/loss"]) == 2 and tags["train/loss"][-1] < tags["train/loss"][0]


@pytest.mark.slow
def test_two_processes_share_a_gs_workdir_and_restore_from_it(gcs_bucket, tmp_path):
    """2 hosts (launch/local.sh's environment) save into one bucket, then both restore from it;
    the result is the straight 2-process run's, on a local workdir."""
    workdir, straight = paths.join(gcs_bucket, "run"), str(tmp_path / "straight")
    schedule = "--config.train.min_lr_ratio=1.0"  # the same learning rates for 4 + 4 steps as for 8
    finish(start(straight, schedule, "--config.train.steps=8"))
    outs = finish(start(workdir, schedule, "--config.train.steps=4"))
    assert latest(workdir) == 4 and "final: step 4" in outs[0]
    outs = finish(start(workdir, schedule, "--config.train.steps=8"))
    assert "steps 4->8" in outs[0] and latest(workdir) == 8
    # each host wrote its own shards (an OCDBT directory per process) into the bucket
    state = paths.join(workdir, "checkpoints", "8", "state")
    assert {paths.relative(p, state).split("/")[0] for p in paths.glob(paths.join(state, "ocdbt.process_*"))} \
        == {"ocdbt.process_0", "ocdbt.process_1"}
    assert_same_params(host_params(workdir), host_params(straight))
