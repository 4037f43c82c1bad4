"""Launch scripts: the gcloud commands they would run (--dry-run), shellcheck, local multi-process."""

import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")


def dry_run(command, *args) -> list[list[str]]:
    """The commands `tpu_vm.sh COMMAND --dry-run ARGS` prints (before any `--` tpustack args)."""
    out = subprocess.run(["bash", TPU_VM, command, "--dry-run", *args], capture_output=True, text=True,
                         check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def test_v5p_32_multihost_job():
    (create,) = dry_run("create", "--name", "llama", "--zone", "us-east5-a", "--accelerator-type", "v5p-32",
                        "--queued", "--project", "proj")
    assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert {"--node-id=llama", "--zone=us-east5-a", "--accelerator-type=v5p-32",
            "--runtime-version=v2-alpha-tpuv5", "--project=proj"} <= set(create)
    archive, scp, install = dry_run("setup", "--name", "llama", "--zone", "us-east5-a")
    assert archive[:3] == ["git", "-C", ROOT] and "archive" in archive
    assert "--worker=all" in scp and "--worker=all" in install
    assert any(a.startswith("--command=") and "pip install" in a and "[tpu]" in a for a in install)
    (run,) = dry_run("run", "--name", "llama", "--zone", "us-east5-a", "--", "train", "--config",
                     "configs/llama2_7b.py", "--config.mesh.fsdp=-1", "--workdir", "gs://bucket/run")
    assert run[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "llama"] and "--worker=all" in run
    remote = next(a for a in run if a.startswith("--command="))[len("--command="):]
    assert ".venv/bin/tpustack train --config configs/llama2_7b.py --config.mesh.fsdp=-1" in remote
    assert "logs/$(hostname).log" in remote  # one log file per worker
    (delete,) = dry_run("delete", "--name", "llama", "--zone", "us-east5-a", "--queued")
    assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"] and "--force" in delete


def test_v5e_16_direct_and_multislice():
    out = subprocess.run(["bash", TPU_VM, "create", "--name", "e", "--zone", "us-west4-a", "--accelerator-type",
                          "v5e-16", "--dry-run"], capture_output=True, text=True, check=True).stdout
    assert "# v5e-16: 16 chips on 4 host(s)" in out
    (create,) = dry_run("create", "--name", "e", "--zone", "us-west4-a", "--accelerator-type", "v5e-16", "--spot")
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)
    (multi,) = dry_run("create", "--name", "e", "--zone", "us-west4-a", "--accelerator-type", "v5e-16",
                       "--num-slices", "2")
    assert "--node-count=2" in multi and "--node-prefix=e" in multi and "queued-resources" in multi
    (tail,) = dry_run("tail", "--name", "e", "--zone", "us-west4-a", "--worker", "0")
    assert "--worker=0" in tail


def test_bad_arguments_exit_2():
    result = subprocess.run(["bash", TPU_VM, "create", "--name", "x", "--zone", "z", "--accelerator-type", "v9-8",
                             "--dry-run"], capture_output=True, text=True)
    assert result.returncode == 2 and "unknown accelerator type v9-8" in result.stderr
    result = subprocess.run(["bash", TPU_VM, "run", "--zone", "z"], capture_output=True, text=True)
    assert result.returncode == 2 and "needs --name" in result.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_scripts_are_shellcheck_clean():
    scripts = [os.path.join(ROOT, "launch", f) for f in os.listdir(os.path.join(ROOT, "launch")) if f.endswith(".sh")]
    scripts.append(os.path.join(ROOT, ".ci", "run"))
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    import socket
    import sys

    from helpers import TINY_OVERRIDES
    from tb_events import scalar_tags

    args = ["train", "--config", "configs/tiny.py", *[f"--config.{k}={v}" for k, v in TINY_OVERRIDES.items()],
            "--config.train.steps=4", "--config.train.log_every=1", "--config.mesh.fsdp=4",
            "--config.mesh.data=2", "--no-samples"]
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHON": sys.executable}
    multi = subprocess.run(["bash", os.path.join(ROOT, "launch", "local.sh"), "--processes", "2",
                            "--devices-per-process", "4", "--port", str(port), "--logdir", str(tmp_path / "logs"),
                            "--", *args, "--workdir", str(tmp_path / "multi")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    logs = "".join(open(tmp_path / "logs" / f"process_{i}.log").read()[-1500:] for i in range(2))
    assert multi.returncode == 0, logs
    single = subprocess.run([sys.executable, "-m", "tpustack", *args, "--workdir", str(tmp_path / "single")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi_losses = scalar_tags(str(tmp_path / "multi" / "tb"))["train/loss"]
    single_losses = scalar_tags(str(tmp_path / "single" / "tb"))["train/loss"]
    print(f"\nlosses 2 processes x 4 devices: {multi_losses}\nlosses 1 process x 8 devices:   {single_losses}")
    assert len(multi_losses) == len(single_losses) == 4
    assert multi_losses == pytest.approx(single_losses, rel=1e-6)
    # only process 0 wrote TensorBoard events; both took part in the checkpoint
    assert len(os.listdir(tmp_path / "multi" / "tb")) == 1
    assert "final: step 4" in open(tmp_path / "logs" / "process_0.log").read()
    assert "final:" not in open(tmp_path / "logs" / "process_1.log").read()
