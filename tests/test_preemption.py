"""Stopping early on many hosts: SIGTERM to one host, or clocks that disagree, stop every
host after the same step; all save it and exit 0, and resuming continues bit for bit.

Two real multi-controller JAX processes on localhost (gloo collectives), as launch/local.sh
runs them; the single-process StopSignal is checked directly."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tpustack.checkpoint import Checkpointer
from tpustack.train.preemption import CLOCK_SKEW_ENV, StopSignal
from tpustack.weights import load_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A one-layer model: the test is about the loop's control flow, not the math.
ARGS = ["train", "--config", "configs/tiny.py", "--no-samples", "--config.model.num_layers=1",
        "--config.model.d_model=64", "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
        "--config.model.ffn_dim=128", "--config.train.batch_size=8", "--config.train.seq_len=32",
        "--config.train.eval_batches=1", "--config.train.eval_every=0", "--config.train.log_every=1",
        "--config.data.max_bytes=200000", "--config.checkpoint.every=10", "--config.mesh.data=-1",
        "--config.mesh.fsdp=1"]
STEPS = 60


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(workdir: str, *extra: str, env_for=lambda i: {}) -> list[subprocess.Popen]:
    port = _port()
    procs = []
    for i in range(2):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TPUSTACK_COORDINATOR": f"localhost:{port}",
               "TPUSTACK_NUM_PROCESSES": "2", "TPUSTACK_PROCESS_ID": str(i), "TPUSTACK_LOCAL_DEVICES": "2",
               **env_for(i)}
        env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices are for this process only
        procs.append(subprocess.Popen([sys.executable, "-m", "tpustack", *ARGS, *extra, "--workdir", workdir],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for i, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-3000:]}"
    return outs


def latest(workdir: str) -> int:
    try:
        return Checkpointer(workdir, read_only=True).latest_step() or 0
    except FileNotFoundError:  # not created yet, or a step deleted while listing
        return 0


def params_of(workdir: str):
    return jax.device_get(load_weights(workdir).params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted 2-process run, the reference for every resumed one."""
    workdir = str(tmp_path_factory.mktemp("straight") / "run")
    finish(start(workdir, f"--config.train.steps={STEPS}"))
    assert latest(workdir) == STEPS
    return params_of(workdir)


@pytest.mark.slow
def test_sigterm_to_one_host_stops_both_at_one_step_and_resumes_bit_for_bit(tmp_path, straight):
    workdir = str(tmp_path / "run")
    procs = start(workdir, f"--config.train.steps={STEPS}")
    deadline = time.time() + 300
    while latest(workdir) < 10 and time.time() < deadline and procs[0].poll() is None:
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # host 1 only: host 0 hears of it through the agreement
    outs = finish(procs)
    # host 0 speaks for the job: it never got the signal, yet it stopped at the agreed step
    step = int(outs[0].split("SIGTERM: saving step ")[1].split()[0])
    assert 10 <= step < STEPS, outs[0][-3000:]
    assert "preempted: checkpoint saved at step" in outs[0]
    assert latest(workdir) == step  # both hosts saved the same, agreed step
    finish(start(workdir, f"--config.train.steps={STEPS}"))
    assert latest(workdir) == STEPS
    for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_time_limit_with_clocks_that_disagree_stops_both_at_one_step(tmp_path, straight):
    workdir = str(tmp_path / "run")
    # host 1's clock runs 1000 s ahead: it reaches the limit at once, host 0 much later
    procs = start(workdir, f"--config.train.steps={STEPS}", "--config.train.time_limit_s=1000",
                  env_for=lambda i: {CLOCK_SKEW_ENV: "1000.5"} if i == 1 else {})
    outs = finish(procs)
    step = int(outs[0].split("time limit: saving step ")[1].split()[0])
    assert 1 <= step < STEPS and latest(workdir) == step
    finish(start(workdir, f"--config.train.steps={STEPS}"))
    for a, b in zip(jax.tree.leaves(params_of(workdir)), jax.tree.leaves(straight)):
        np.testing.assert_array_equal(a, b)


def test_single_process_stop_reasons():
    now = [0.0]
    with StopSignal(time_limit_s=5.0, clock=lambda: now[0]) as stop:
        assert stop.reason(1) is None
        now[0] = 5.5
        assert stop.reason(2) == "time limit"
        os.kill(os.getpid(), signal.SIGTERM)  # the handler turns it into a flag, not an exit
        assert stop.reason(3) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is not None
