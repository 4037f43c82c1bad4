"""Launch scripts. tpu_vm.sh runs against a fake `gcloud` that records its argv and refuses every
command a test did not allow: dry runs (a v5p-32, a v6e-16 and 2 x v5p-16 multislice), the wait
for a queued resource, and the scripts the workers run, executed here in a sandbox HOME.
Then shellcheck, the walk-through in docs/tpu_vm.md, and local.sh's two processes."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_VM = os.path.join(ROOT, "launch", "tpu_vm.sh")
UV_PIN = "0.13.9"
PYTHON_PIN = "3.12.16"

FAKE_GCLOUD = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
    f.write(json.dumps(argv) + "\\n")
words = " ".join(a for a in argv if not a.startswith("-"))
allowed = [p for p in os.environ.get("FAKE_GCLOUD_ALLOW", "").split("|") if p]
if not any(words.startswith(p) for p in allowed):
    sys.stderr.write("fake gcloud: this test did not expect a gcloud call: %r\\n" % argv)
    sys.exit(97)
if words.startswith("compute tpus queued-resources describe"):
    path = os.environ["FAKE_GCLOUD_STATES"]
    states = open(path).read().split()
    print(states[0])
    open(path, "w").write(" ".join(states[1:] or states))
"""


class FakeGcloud:
    """A `gcloud` first on PATH: records every call; answers only the commands in `allow`."""

    def __init__(self, tmp_path):
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir()
        script = bin_dir / "gcloud"
        script.write_text(FAKE_GCLOUD.format(python=sys.executable))
        script.chmod(0o755)
        self.log = tmp_path / "gcloud_calls.jsonl"
        self.log.write_text("")
        self.states = tmp_path / "states"
        self.env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_GCLOUD_LOG": str(self.log),
                    "FAKE_GCLOUD_STATES": str(self.states), "FAKE_GCLOUD_ALLOW": "", "TMPDIR": str(tmp_path)}

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run(self, *args, allow=(), states=(), check=True):
        self.states.write_text(" ".join(states))
        env = {**self.env, "FAKE_GCLOUD_ALLOW": "|".join(allow)}
        result = subprocess.run(["bash", TPU_VM, *args], capture_output=True, text=True, env=env, timeout=60)
        if check:
            assert result.returncode == 0, result.stderr
        return result


@pytest.fixture
def gcloud(tmp_path):
    return FakeGcloud(tmp_path)


def commands(stdout: str) -> list[list[str]]:
    """The command lines a dry run printed (comments left out), split as bash would."""
    return [shlex.split(line) for line in stdout.splitlines() if line.strip() and not line.startswith("#")]


def flag(cmd: list[str], name: str) -> str | None:
    return next((a.split("=", 1)[1] for a in cmd if a.startswith(name + "=")), None)


def remote(cmd: list[str]) -> str:
    return flag(cmd, "--command") or ""


def step(cmd: list[str]) -> tuple:
    """A command reduced to what the sequence test compares: the gcloud verb and its target."""
    if cmd[0] == "git":
        return ("git archive",)
    assert cmd[0] == "gcloud", cmd
    words = [a for a in cmd[1:] if not a.startswith("-")]
    if words[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        return ("scp", words[-1].split(":")[0])
    if words[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        kind = "setup" if "uv python install" in remote(cmd) else "run" if "tpustack train" in remote(cmd) else "?"
        return ("ssh", words[4], kind)
    return (" ".join(words),)


# The three shapes of the issue: options for create/up, the nodes, workers per node.
SHAPES = {
    "v5p-32": (["--name", "llama", "--zone", "us-east5-a", "--accelerator-type", "v5p-32", "--queued"],
               ["llama"], 4),
    "v6e-16": (["--name", "tri", "--zone", "us-east1-d", "--accelerator-type", "v6e-16"], ["tri"], 4),
    "2x v5p-16": (["--name", "ms", "--zone", "us-east5-a", "--accelerator-type", "v5p-16", "--num-slices", "2"],
                  ["ms-0", "ms-1"], 2),
}
TRAIN = ["train", "--config", "configs/llama2_7b.py", "--config.mesh.fsdp=-1", "--workdir", "gs://bkt/run"]


def train_args(shape: str) -> list[str]:
    return TRAIN + (["--config.mesh.dcn_data=2"] if shape.startswith("2x") else [])


@pytest.mark.parametrize("shape", SHAPES)
def test_up_lists_every_gcloud_command_from_an_empty_project_to_the_first_step(gcloud, shape):
    opts, nodes, workers = SHAPES[shape]
    name, queued = opts[1], "--queued" in opts or "--num-slices" in opts
    result = gcloud.run("up", "--project", "proj", *opts, "--dry-run", "--", *train_args(shape))
    cmds = commands(result.stdout)
    expected = [("services enable tpu.googleapis.com",), ("storage buckets create gs://bkt",),
                ("projects describe proj",), ("storage buckets add-iam-policy-binding gs://bkt",)]
    if queued:
        expected += [(f"compute tpus queued-resources create {name}",),
                     (f"compute tpus queued-resources describe {name}",)]
    else:
        expected += [(f"compute tpus tpu-vm create {name}",)]
    expected += [("git archive",)]
    for node in nodes:
        expected += [("scp", node), ("ssh", node, "setup")]
    expected += [("ssh", node, "run") for node in nodes]
    assert [step(c) for c in cmds] == expected
    assert gcloud.calls() == []  # a dry run never runs gcloud

    for cmd in cmds:
        if cmd[0] == "gcloud":
            assert "--project=proj" in cmd or cmd[1:4] == ["projects", "describe", "proj"], cmd
        if step(cmd)[0] in ("scp", "ssh"):
            assert "--worker=all" in cmd and "--zone=" + opts[3] in cmd, cmd
    create = next(c for c in cmds if "create" in c and "tpus" in c)
    accel = opts[5]
    assert flag(create, "--accelerator-type") == accel
    runtime = {"v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}[accel[:3]]
    assert flag(create, "--runtime-version" if queued else "--version") == runtime
    if len(nodes) > 1:
        assert flag(create, "--node-count") == "2" and flag(create, "--node-prefix") == name
        assert flag(create, "--node-id") is None
    elif queued:
        assert flag(create, "--node-id") == name
    describe = [c for c in cmds if "describe" in c and "queued-resources" in c]
    assert all(flag(c, "--format") == "value(state.state)" for c in describe)
    bucket = next(c for c in cmds if "buckets" in c and "create" in c)
    assert flag(bucket, "--location") == opts[3].rsplit("-", 1)[0]  # the TPUs' region
    binding = next(c for c in cmds if "add-iam-policy-binding" in c)
    assert flag(binding, "--member") == "serviceAccount:PROJECT_NUMBER-compute@developer.gserviceaccount.com"
    assert flag(binding, "--role") == "roles/storage.objectUser"
    # the slice summary names the workers that will each run one tpustack process
    assert f"{workers} TPU VM worker(s) per slice; {len(nodes)} slice(s)" in result.stdout


POSITIONS = {
    "first": lambda cmd, opts, rest: ["--dry-run", cmd, *opts, *rest],
    "between options": lambda cmd, opts, rest: [cmd, *opts[:2], "--dry-run", *opts[2:], *rest],
    "after --": lambda cmd, opts, rest: [cmd, *opts, *(rest or ["--"]), "--dry-run"],
}


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("command", ["up", "create", "wait", "setup", "run", "stop", "tail", "delete"])
def test_dry_run_is_honoured_wherever_it_stands(gcloud, command, where):
    opts = SHAPES["2x v5p-16"][0] + ["--project", "proj"]
    rest = ["--", *train_args("2x v5p-16")] if command in ("up", "run") else []
    result = gcloud.run(*POSITIONS[where](command, opts, rest))
    assert gcloud.calls() == [], "a dry run called gcloud"
    cmds = commands(result.stdout)
    assert cmds and all(c[0] in ("gcloud", "git") for c in cmds)
    for cmd in cmds:
        assert "--dry-run" not in cmd and "--dry-run" not in remote(cmd)  # never passed on to tpustack


def test_dry_run_after_dashes_is_not_given_to_tpustack(gcloud):
    result = gcloud.run("run", "--name", "x", "--zone", "z", "--", "train", "--config", "c.py", "--dry-run")
    assert gcloud.calls() == []
    (ssh,) = commands(result.stdout)
    assert ".venv/bin/tpustack train --config c.py >" in remote(ssh)


# Google's tables (cloud.google.com/tpu/docs/v4, /v5p, /v5e, /v6e): chips, hosts, TPU VMs per slice.
SLICES = [
    ("v4-8", 4, "1", 1), ("v4-16", 8, "2", 2), ("v4-32", 16, "4", 4), ("v4-128", 64, "16", 16),
    ("v5p-8", 4, "1", 1), ("v5p-16", 8, "2", 2), ("v5p-32", 16, "4", 4), ("v5p-64", 32, "8", 8),
    ("v5p-128", 64, "16", 16),
    ("v5e-1", 1, "1/8", 1), ("v5e-4", 4, "1/2", 1), ("v5e-8", 8, "1", 1), ("v5e-16", 16, "2", 4),
    ("v5e-256", 256, "32", 64),
    ("v6e-4", 4, "1/2", 1), ("v6e-8", 8, "1", 1), ("v6e-16", 16, "2", 4), ("v6e-32", 32, "4", 8),
    ("v6e-256", 256, "32", 64),
]


@pytest.mark.parametrize("accel,chips,hosts,vms", SLICES)
def test_slice_table_matches_the_published_host_counts(gcloud, accel, chips, hosts, vms):
    out = gcloud.run("create", "--name", "n", "--zone", "z", "--accelerator-type", accel, "--dry-run").stdout
    assert f"# {accel}: {chips} chips, {hosts} host(s), {vms} TPU VM worker(s) per slice" in out


@pytest.mark.parametrize("accel", ["v5p-12", "v4-4", "v6e-12", "v5e-2", "v9-8", "v5p-x"])
def test_impossible_slices_exit_2(gcloud, accel):
    result = gcloud.run("create", "--name", "n", "--zone", "z", "--accelerator-type", accel, "--dry-run", check=False)
    assert result.returncode == 2 and accel in result.stderr and gcloud.calls() == []


def test_v5e_keeps_its_gcloud_name(gcloud):
    (create,) = commands(gcloud.run("create", "--name", "e", "--zone", "us-west4-a", "--accelerator-type", "v5e-16",
                                    "--spot", "--dry-run").stdout)
    assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert {"--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"} <= set(create)


def test_setup_installs_a_pinned_python_with_a_pinned_uv_on_every_worker_of_every_node(gcloud):
    result = gcloud.run("setup", *SHAPES["2x v5p-16"][0][:4], "--num-slices", "2", "--dry-run")
    cmds = commands(result.stdout)
    assert [step(c) for c in cmds] == [("git archive",), ("scp", "ms-0"), ("ssh", "ms-0", "setup"),
                                       ("scp", "ms-1"), ("ssh", "ms-1", "setup")]
    archive = cmds[0][cmds[0].index("-o") + 1]
    for scp in (cmds[1], cmds[3]):
        assert archive in scp and "--worker=all" in scp
    script = remote(cmds[2])
    order = ["tar -xzf $HOME/tpustack.tar.gz -C $HOME/tpustack",
             f"python3 -m pip install --user --quiet --disable-pip-version-check uv=={UV_PIN}",
             f"$HOME/.local/bin/uv python install {PYTHON_PIN}",
             f"$HOME/.local/bin/uv venv --clear --managed-python --python {PYTHON_PIN} .venv",
             "$HOME/.local/bin/uv pip install --python .venv/bin/python -e '.[tpu]'",
             ".venv/bin/tpustack --help"]
    positions = [script.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), script
    assert tuple(int(x) for x in PYTHON_PIN.split(".")[:2]) >= (3, 11)
    mirrored = commands(gcloud.run("setup", "--name", "x", "--zone", "z", "--python-mirror", "https://m/x",
                                   "--dry-run").stdout)
    assert f"UV_PYTHON_INSTALL_MIRROR=https://m/x $HOME/.local/bin/uv python install {PYTHON_PIN}" in remote(
        mirrored[2])


def test_run_clears_stale_tpu_processes_and_the_lockfile_on_every_node_before_it_starts(gcloud):
    result = gcloud.run("run", *SHAPES["2x v5p-16"][0][:4], "--num-slices", "2", "--dry-run", "--",
                        *train_args("2x v5p-16"))
    cmds = commands(result.stdout)
    assert [step(c) for c in cmds] == [("ssh", "ms-0", "run"), ("ssh", "ms-1", "run")]
    script = remote(cmds[0])
    assert remote(cmds[1]) == script
    order = ['kill -TERM "$(our_pid)"', "xargs -r sudo kill -9", "sudo rm -f /tmp/libtpu_lockfile",
             "setsid nohup .venv/bin/tpustack train --config configs/llama2_7b.py --config.mesh.fsdp=-1"]
    positions = [script.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), script
    assert '"logs/$(hostname).log"' in script  # one log per worker


def sandbox_bin(tmp_path, events):
    """Stand-ins for sudo, python3 and uv that write what they were asked into `events`."""
    bin_dir = tmp_path / "sandbox_bin"
    bin_dir.mkdir()
    scripts = {
        # sudo: find runs for real (over this machine's /proc); rm, kill and apt-get are only recorded
        "sudo": f'echo "sudo $*" >> {events}; if [ "$1" = find ]; then exec "$@"; fi',
        "python3": f"""echo "python3 $*" >> {events}
if [ "$*" = "-m pip --version" ]; then exit 0; fi
mkdir -p "$HOME/.local/bin"; cp {bin_dir}/uv.template "$HOME/.local/bin/uv"; chmod +x "$HOME/.local/bin/uv" """,
        "uv.template": f"""echo "uv $*" >> {events}
if [ "$1" = venv ]; then mkdir -p .venv/bin; for b in python tpustack; do
  printf '#!/bin/sh\\necho "$(basename "$0") $*" >> {events}\\n' > .venv/bin/$b; chmod +x .venv/bin/$b; done; fi""",
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body + "\n")
        (bin_dir / name).chmod(0o755)
    return bin_dir


def test_setup_script_runs_top_to_bottom_on_a_bare_worker(gcloud, tmp_path):
    home, events = tmp_path / "home", tmp_path / "events"
    (home / "tpustack" / "logs").mkdir(parents=True)
    (home / "tpustack" / "logs" / "old.log").write_text("kept")
    (home / "tpustack" / "stale_module.py").write_text("removed")
    src = tmp_path / "src"
    (src / "launch").mkdir(parents=True)
    (src / "pyproject.toml").write_text("[project]\nname = 'tpustack'\n")
    with tarfile.open(home / "tpustack.tar.gz", "w:gz") as tar:
        tar.add(src / "pyproject.toml", arcname="pyproject.toml")
    cmds = commands(gcloud.run("setup", "--name", "x", "--zone", "z", "--dry-run").stdout)
    env = {"HOME": str(home), "PATH": f"{sandbox_bin(tmp_path, events)}:/usr/bin:/bin"}
    done = subprocess.run(["bash", "-c", remote(cmds[2])], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert events.read_text().splitlines() == [
        "python3 -m pip --version",
        f"python3 -m pip install --user --quiet --disable-pip-version-check uv=={UV_PIN}",
        f"uv python install {PYTHON_PIN}",
        f"uv venv --clear --managed-python --python {PYTHON_PIN} .venv",
        "uv pip install --python .venv/bin/python -e .[tpu]",
        "python --version",
        "tpustack --help",
    ]
    assert (home / "tpustack" / "pyproject.toml").exists() and (home / "tpustack" / "logs" / "old.log").exists()
    assert not (home / "tpustack" / "stale_module.py").exists()


def test_run_script_stops_the_last_run_clears_the_lockfile_then_starts(gcloud, tmp_path):
    home, events = tmp_path / "home", tmp_path / "events"
    venv_bin = home / "tpustack" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (home / "tpustack" / "logs").mkdir()
    (venv_bin / "tpustack").write_text(f'#!/bin/sh\necho "tpustack $* FOO=$FOO" >> {events}\n')
    (venv_bin / "tpustack").chmod(0o755)
    stale = subprocess.Popen(["bash", "-c", "exec -a tpustack sleep 300"])  # looks like a previous run
    try:
        (home / "tpustack" / "logs" / "tpustack.pid").write_text(str(stale.pid))
        cmds = commands(gcloud.run("run", "--name", "x", "--zone", "z", "--env", "FOO=bar baz", "--dry-run", "--",
                                   "train", "--config", "c.py", "--workdir", "gs://b/r").stdout)
        env = {"HOME": str(home), "PATH": f"{sandbox_bin(tmp_path, events)}:/usr/bin:/bin"}
        done = subprocess.run(["bash", "-c", remote(cmds[0])], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert stale.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while "tpustack train" not in (events.read_text() if events.exists() else ""):
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
    finally:
        if stale.poll() is None:
            stale.kill()
    lines = events.read_text().splitlines()
    assert lines[-2:] == ["sudo rm -f /tmp/libtpu_lockfile", "tpustack train --config c.py --workdir gs://b/r FOO=bar baz"]
    assert all(line.startswith("sudo find /proc/") for line in lines[:-2])  # looked for chips still held
    assert int((home / "tpustack" / "logs" / "tpustack.pid").read_text()) != stale.pid


def test_create_queued_waits_until_active(gcloud):
    opts = SHAPES["v5p-32"][0]
    allow = ["compute tpus queued-resources create", "compute tpus queued-resources describe"]
    result = gcloud.run("create", *opts, "--poll", "0", allow=allow, states=["ACCEPTED", "PROVISIONING", "ACTIVE"])
    calls = gcloud.calls()
    assert [c[:5] for c in calls] == [["compute", "tpus", "queued-resources", "create", "llama"]] + [
        ["compute", "tpus", "queued-resources", "describe", "llama"]] * 3
    assert all("--format=value(state.state)" in c for c in calls[1:])
    assert "ACTIVE" in result.stdout and "PROVISIONING" in result.stderr


@pytest.mark.parametrize("states,timeout,message", [(["FAILED"], "60", "is FAILED"),
                                                    (["ACCEPTED"], "0", "still ACCEPTED after 0s")])
def test_wait_gives_up_on_failure_or_timeout(gcloud, states, timeout, message):
    result = gcloud.run("wait", "--name", "q", "--zone", "z", "--poll", "0", "--timeout", timeout,
                        allow=["compute tpus queued-resources describe"], states=states, check=False)
    assert result.returncode == 1 and message in result.stderr
    assert len(gcloud.calls()) == 1


def test_create_no_wait_prints_the_wait_command(gcloud):
    result = gcloud.run("create", *SHAPES["v5p-32"][0], "--no-wait", allow=["compute tpus queued-resources create"])
    assert len(gcloud.calls()) == 1
    assert "wait --name llama --zone us-east5-a" in result.stdout


@pytest.mark.parametrize("opts,workdir,warned", [
    (["--accelerator-type", "v5p-32"], "runs/local", "multi-host run (4 workers)"),
    (["--accelerator-type", "v6e-16"], None, "multi-host run (4 workers)"),
    (["--num-slices", "2"], "/mnt/disk/run", "multi-host run (2 slices)"),
    ([], "runs/local", "if n has more than one host"),
    (["--accelerator-type", "v5p-8"], "runs/local", None),
    (["--accelerator-type", "v5p-32"], "gs://b/run", None),
])
def test_a_local_workdir_on_many_hosts_is_warned_about(gcloud, opts, workdir, warned):
    wd = ["--workdir", workdir] if workdir else []
    dcn = ["--config.mesh.dcn_data=2"] if "--num-slices" in opts else []
    result = gcloud.run("run", "--name", "n", "--zone", "z", *opts, "--dry-run", "--", "train", *wd, *dcn)
    if warned is None:
        assert "warning" not in result.stderr
    else:
        assert warned in result.stderr
        assert "restore cannot work" in result.stderr and "spot VM" in result.stderr and "gs://" in result.stderr


def test_multislice_run_without_dcn_axis_is_warned_about(gcloud):
    result = gcloud.run("run", "--name", "n", "--zone", "z", "--num-slices", "2", "--dry-run", "--", "train",
                        "--workdir", "gs://b/r")
    assert "--config.mesh.dcn_data=2" in result.stderr


def test_tail_stop_delete_address_every_node(gcloud):
    base = SHAPES["2x v5p-16"][0][:4] + ["--num-slices", "2", "--dry-run"]
    for command in ("tail", "stop"):
        cmds = commands(gcloud.run(command, *base).stdout)
        assert [c[5] for c in cmds] == ["ms-0", "ms-1"] and all("--worker=all" in c for c in cmds)
    (follow,) = commands(gcloud.run("tail", *base, "--follow", "--node", "1", "--worker", "2").stdout)
    assert follow[5] == "ms-1" and "--worker=2" in follow and "-F" in remote(follow)
    (delete,) = commands(gcloud.run("delete", *base).stdout)
    assert delete[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "ms"] and "--force" in delete
    (single,) = commands(gcloud.run("delete", "--name", "v", "--zone", "z", "--dry-run").stdout)
    assert single[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"]
    assert gcloud.calls() == []


@pytest.mark.parametrize("args,message", [
    (["run", "--zone", "z"], "needs --name"),
    (["run", "--name", "n", "--zone", "z", "--dry-run"], "needs the tpustack command"),
    (["up", "--name", "n", "--zone", "z", "--accelerator-type", "v5p-8", "--dry-run", "--", "train"], "needs --project"),
    (["tail", "--name", "n", "--zone", "z", "--follow", "--worker", "all", "--dry-run"], "--follow follows one"),
    (["run", "--name", "n", "--zone", "z", "--env", "1X=2", "--dry-run", "--", "train"], "--env takes NAME=VALUE"),
    (["create", "--name", "n", "--zone", "z", "--frobnicate"], "unknown option --frobnicate"),
    (["launch", "--name", "n", "--zone", "z"], "unknown command launch"),
])
def test_bad_arguments_exit_2(gcloud, args, message):
    result = gcloud.run(*args, check=False)
    assert result.returncode == 2 and message in result.stderr and gcloud.calls() == []


def doc_commands() -> list[list[str]]:
    """Every `launch/tpu_vm.sh ...` command in docs/tpu_vm.md's shell blocks (continuations joined)."""
    text = open(os.path.join(ROOT, "docs", "tpu_vm.md")).read()
    found = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("launch/tpu_vm.sh "):
                found.append(shlex.split(line, comments=True)[1:])
    return found


def test_the_walkthrough_commands_dry_run_cleanly(gcloud):
    found = doc_commands()
    assert {c[0] for c in found} >= {"up", "create", "wait", "setup", "run", "tail", "stop", "delete"}
    for args in found:
        result = gcloud.run(*args, "--dry-run", check=False)
        assert result.returncode == 0, (args, result.stderr)
        assert "warning: local workdir" not in result.stderr, args
    assert gcloud.calls() == []


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
