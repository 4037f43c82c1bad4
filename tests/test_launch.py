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
