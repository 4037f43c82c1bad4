"""Config loading, overrides and validation: every mistake is a one-line UserError."""

import dataclasses
import glob
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

from tpustack.cli import split_overrides
from tpustack.config import (COMPUTE_DTYPE, FIELD_CHECKS, _SECTIONS, config_from_dict, config_to_dict, load_config,
                             load_config_dict)
from tpustack.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = ["configs/tiny.py", "configs/bench_125m.py", "configs/llama2_7b.py", "configs/llama2_13b.py",
           "configs/llama3_8b.py"]


@pytest.mark.parametrize("path", CONFIGS)
def test_every_config_loads(path):
    config = load_config(path)
    assert config.model.num_params() > 0


def test_parameter_counts_match_the_published_models():
    assert round(load_config("configs/bench_125m.py").model.num_params() / 1e6, 1) == 124.7  # DESIGN.md
    assert round(load_config("configs/llama2_7b.py").model.num_params() / 1e9, 2) == 6.74
    assert round(load_config("configs/llama2_13b.py").model.num_params() / 1e9, 2) == 13.02
    assert round(load_config("configs/llama3_8b.py").model.num_params() / 1e9, 2) == 8.03


def test_overrides_are_typed():
    config = load_config("configs/tiny.py", {"model.num_layers": "3", "train.lr": "1e-3",
                                             "model.scan_layers": "true", "data.source": "text",
                                             "data.path": "x.txt"})
    assert config.model.num_layers == 3 and config.train.lr == 1e-3 and config.model.scan_layers is True


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(UserError, match=r"--config.model.num_layer: unknown key 'num_layer' in config.model; "
                                        r"did you mean model.num_layers\?"):
        load_config("configs/tiny.py", {"model.num_layer": "3"})


@pytest.mark.parametrize("key,value,match", [
    ("model.num_layers", "four", r"expected a int"),
    ("model.num_kv_heads", "4", r"model.num_kv_heads: 4 must divide model.num_heads=6"),
    ("model.remat_policy", "everything", r"model.remat_policy: 'everything' is not 'none', save_dots_except_mlp_in, save_qkv_proj"),
    ("train.precision", "fp4", r"train.precision: 'fp4' is not one of"),
    ("train.grad_accum", "5", r"train.grad_accum: 5 must divide train.batch_size=64"),
    ("train.seq_len", "4096", r"train.seq_len: 4096 exceeds model.max_seq_len=1024"),
    ("data.source", "text", r"data.path: data.source='text' needs a path"),
])
def test_invalid_values(key, value, match):
    with pytest.raises(UserError, match=match):
        load_config("configs/tiny.py", {key: value})


def test_missing_config_file():
    with pytest.raises(UserError, match=r"--config: no such file 'configs/nope.py'"):
        load_config("configs/nope.py")


@pytest.mark.parametrize("tied", [False, True])
def test_num_params_counts_the_real_parameter_tree(tied):
    import jax
    import jax.numpy as jnp

    from tpustack.model import Decoder

    cfg = load_config("configs/tiny.py", {"model.tie_embeddings": str(tied)}).model
    shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == cfg.num_params()


# ---- every field validated at load: one UserError naming the field, nothing truncated ----

# (key, bad value): each must fail naming the field; every field with a range or choices has one.
BAD_VALUES = [
    ("name", ""),
    ("model.vocab_size", "0"), ("model.d_model", "-8"), ("model.num_layers", "0"), ("model.num_heads", "0"),
    ("model.num_kv_heads", "0"), ("model.head_dim", "-2"), ("model.ffn_dim", "0"), ("model.rope_theta", "0"),
    ("model.norm_eps", "-1e-5"), ("model.tie_embeddings", "maybe"), ("model.max_seq_len", "0"),
    ("model.init_std", "0"), ("model.param_dtype", "bfloat16"), ("model.dtype", "float64"),
    ("model.scan_layers", "2"), ("model.remat_policy", "everything"), ("model.attention_impl", "flash"),
    ("model.weight_quant", "int3"), ("model.weight_group", "100"), ("model.matmul_impl", "cuda"), ("model.decode_kernels", "cpu"),
    ("model.lora_rank", "-1"), ("model.lora_alpha", "0"), ("model.lora_targets", "q,lm_head"),
    ("mesh.data", "0"), ("mesh.stage", "-3"), ("mesh.fsdp", "-2"), ("mesh.tensor", "0"), ("mesh.dcn_data", "0"),
    ("mesh.dcn_stage", "-1"), ("mesh.dcn_fsdp", "0"), ("mesh.dcn_tensor", "0"),
    ("parallel.zero_stage", "4"), ("parallel.microbatches", "0"), ("parallel.pipeline_repeats", "0"),
    ("train.steps", "-1"), ("train.steps", "2.5"), ("train.steps", "1e400"), ("train.steps", "nan"),
    ("train.steps", "1e12"), ("train.batch_size", "0"), ("train.seq_len", "0"), ("train.seq_len", "2048"),
    ("train.grad_accum", "0"), ("train.lr", "-1e-3"), ("train.lr", "0"), ("train.lr", "nan"), ("train.lr", "inf"),
    ("train.warmup_steps", "-1"), ("train.min_lr_ratio", "1.5"), ("train.min_lr_ratio", "-0.1"),
    ("train.weight_decay", "-0.1"), ("train.b1", "1.0"), ("train.b2", "-0.1"), ("train.eps", "0"),
    ("train.clip_norm", "-1"), ("train.precision", "fp4"), ("train.loss_scale_init", "0.5"),
    ("train.loss_scale_growth_interval", "0"), ("train.seed", "-1"), ("train.log_every", "0"),
    ("train.eval_every", "-1"), ("train.eval_batches", "0"), ("train.time_limit_s", "-1"),
    ("train.time_limit_s", "inf"), ("train.samples", "-1"), ("train.sample_len", "0"),
    ("data.source", "csv"), ("data.tokenizer", ""), ("data.bin_dtype", "int8"), ("data.max_bytes", "0"),
    ("data.heldout_fraction", "0.5"), ("data.heldout_fraction", "0"),
    ("checkpoint.every", "-1"), ("checkpoint.keep", "0"), ("checkpoint.async_save", "sometimes"),
    ("distill.alpha", "1.5"), ("distill.temperature", "0"),
]


@pytest.mark.parametrize("key,value", BAD_VALUES)
def test_every_bad_value_names_its_field(key, value):
    with pytest.raises(UserError) as e:
        load_config("configs/tiny.py", {key: value})
    message = str(e.value)
    assert re.match(rf"(--)?config\.{re.escape(key)}[:=]", message), message
    assert "\n" not in message


def test_every_field_has_a_check_and_every_check_a_bad_value():
    fields = {"name"} | {f"{s}.{f.name}" for s, cls in _SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(FIELD_CHECKS) == fields
    checked = {k for k, check in FIELD_CHECKS.items() if check is not None}
    assert checked <= {k for k, _ in BAD_VALUES}


def test_ints_are_never_truncated_but_exact_exponents_are_fine():
    assert load_config("configs/tiny.py", {"train.steps": "1e3"}).train.steps == 1000
    assert load_config("configs/tiny.py", {"train.steps": "20.0"}).train.steps == 20
    with pytest.raises(UserError, match=r"--config.train.steps='2.5': expected a whole number like 310"):
        load_config("configs/tiny.py", {"train.steps": "2.5"})


def test_boundary_values_are_accepted():
    config = load_config("configs/tiny.py", {
        "train.steps": "0", "train.warmup_steps": "0", "train.eval_every": "0", "train.min_lr_ratio": "1",
        "train.b1": "0", "train.clip_norm": "0", "train.time_limit_s": "0", "train.samples": "0",
        "checkpoint.every": "0", "distill.alpha": "0", "model.head_dim": "0", "mesh.fsdp": "-1"})
    assert config.train.min_lr_ratio == 1.0 and config.mesh.fsdp == -1


def _tiny_dict() -> dict:
    return config_to_dict(load_config("configs/tiny.py"))


@pytest.mark.parametrize("section,key,value,match", [
    ("train", "steps", 2.5, r"config.train.steps: expected a whole number, got 2.5"),
    ("train", "steps", True, r"config.train.steps: expected a whole number, got True"),
    ("train", "lr", "3e-3", r"config.train.lr: expected a finite number, got '3e-3'"),
    ("train", "lr", float("inf"), r"config.train.lr: expected a finite number, got inf"),
    ("model", "scan_layers", 1, r"config.model.scan_layers: expected true or false, got 1"),
    ("data", "path", 3, r"config.data.path: expected a string, got 3"),
    ("train", "stpes", 3, r"config.train.stpes: unknown field"),
])
def test_saved_dicts_are_type_checked_too(section, key, value, match):
    data = _tiny_dict()
    data[section][key] = value
    with pytest.raises(UserError, match=match):
        config_from_dict(data)


def test_unknown_section_is_an_error():
    with pytest.raises(UserError, match=r"config.optim: unknown section"):
        config_from_dict({**_tiny_dict(), "optim": {"lr": 1.0}})


def test_a_config_file_assigning_the_wrong_type_is_a_user_error(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from tpustack.config import default_config_dict\n\n"
                    "def get_config(arg=None):\n    cfg = default_config_dict()\n    cfg.train.steps = 2.5\n"
                    "    return cfg\n")
    with pytest.raises(UserError, match=rf"--config: {re.escape(str(path))}: .*'steps'") as e:
        load_config(str(path))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("argv,expected", [
    (["train", "--config.train.lr", "-1e-3", "--workdir", "w"], (["train", "--workdir", "w"], {"train.lr": "-1e-3"})),
    (["--config.train.steps=5", "x"], (["x"], {"train.steps": "5"})),
    (["--config.name", "run"], ([], {"name": "run"})),
])
def test_split_overrides(argv, expected):
    assert split_overrides(argv) == expected


@pytest.mark.parametrize("argv", [["--config.train.steps", "--workdir", "/tmp/x"], ["--config.train.steps"],
                                  ["--config.train.steps", "-h"]])
def test_an_override_without_a_value_never_takes_the_next_flag(argv):
    with pytest.raises(UserError, match=r"^--config.train.steps: needs a value, as --config.train.steps=VALUE$"):
        split_overrides(argv)


def _snapshot(root) -> dict:
    """Every file and directory under root with its size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            digest = hashlib.sha256(open(path, "rb").read()).hexdigest() if os.path.isfile(path) else None
            out[os.path.relpath(path, root)] = (st.st_size if digest else 0, st.st_mtime_ns, digest)
    return out


@pytest.mark.parametrize("bad", [["--config.train.log_every=0"], ["--config.train.steps=1e400"],
                                 ["--config.checkpoint.keep=0"], ["--config.train.steps", "--workdir"]],
                         ids=["log_every", "steps_overflow", "keep", "missing_value"])
def test_cli_bad_value_exits_2_on_one_line_and_leaves_the_checkpoint(bad, tmp_path):
    import numpy as np

    from tpustack.checkpoint import Checkpointer

    workdir = str(tmp_path / "run")
    ckpt = Checkpointer(workdir)
    ckpt.save(5, {"w": np.arange(4.0, dtype=np.float32)}, load_config("configs/tiny.py"), force=True)
    ckpt.close()
    before = _snapshot(workdir)
    assert any(path.startswith(os.path.join("checkpoints", "5")) for path in before)
    args = ["train", "--config", "configs/tiny.py", *bad, workdir]
    if bad[-1] != "--workdir":
        args.insert(-1, "--workdir")
    result = subprocess.run([sys.executable, "-m", "tpustack", *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.stderr[-2000:]
    field = bad[0].split("=")[0][2:]
    assert result.stderr.startswith(("error: " + field + ":", "error: --" + field)), result.stderr
    assert _snapshot(workdir) == before


# ---- precision settled into ModelConfig once, where the config is built ----

def test_compute_dtype_table():
    assert COMPUTE_DTYPE == {"f32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}


@pytest.mark.parametrize("path,precision,dtype", [
    ("configs/tiny.py", None, "float32"), ("configs/tiny.py", "bf16", "bfloat16"),
    ("configs/tiny.py", "fp16", "float16"), ("configs/llama2_7b.py", None, "bfloat16"),
    ("configs/llama2_7b.py", "f32", "float32"),
])
def test_precision_settles_the_model_dtypes(path, precision, dtype):
    config = load_config(path, {"train.precision": precision} if precision else {})
    assert (config.model.dtype, config.model.param_dtype) == (dtype, "float32")


def test_model_dtype_may_repeat_the_precision():
    config = load_config("configs/tiny.py", {"train.precision": "bf16", "model.dtype": "bfloat16"})
    assert config.model.dtype == "bfloat16"


@pytest.mark.parametrize("dtype,precision,fix", [("bfloat16", "f32", "'bf16'"), ("float16", "bf16", "'fp16'")])
def test_model_dtype_contradicting_the_precision_is_an_error(dtype, precision, fix):
    with pytest.raises(UserError, match=rf"^config.model.dtype: '{dtype}' contradicts train.precision='{precision}'"
                                        rf".*drop model.dtype .* or set train.precision={fix}$"):
        load_config("configs/tiny.py", {"model.dtype": dtype, "train.precision": precision})


@pytest.mark.parametrize("path", ["configs/llama2_7b.py", "configs/llama2_13b.py", "configs/llama3_8b.py",
                                  "configs/llama_1b.py"])
def test_full_size_configs_leave_the_dtype_to_the_precision(path):
    cfg = load_config_dict(path)
    assert cfg.model.dtype == "float32" and cfg.model.param_dtype == "float32" and cfg.train.precision == "bf16"


def test_saved_config_round_trips():
    config = load_config("configs/tiny.py", {"train.precision": "bf16"})
    assert config_from_dict(json.loads(json.dumps(config_to_dict(config)))) == config


@pytest.mark.parametrize("saved_dtype,saved_param_dtype,precision,dtype", [
    ("float32", "float32", "bf16", "bfloat16"),  # tiny trained with --config.train.precision=bf16
    ("bfloat16", "float32", "f32", "float32"),  # a full-size config trained with --config.train.precision=f32
    ("bfloat16", "bfloat16", "bf16", "bfloat16"),
])
def test_old_checkpoint_configs_still_load_with_the_dtype_they_trained_in(saved_dtype, saved_param_dtype,
                                                                          precision, dtype):
    data = _tiny_dict()
    data["train"]["precision"] = precision
    data["model"].update(dtype=saved_dtype, param_dtype=saved_param_dtype)
    config = config_from_dict(data)
    assert (config.model.dtype, config.model.param_dtype) == (dtype, "float32")


# ---- no libtpu start-up noise on a machine without a TPU ----

def _accelerator_visible() -> bool:
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return True
    if any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        with open(vendor) as f:
            if f.read().strip() == "0x1ae0":
                return True
    return False


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or _accelerator_visible(),
                    reason="needs libtpu installed on a machine with no TPU or GPU")
def test_cli_on_a_cpu_machine_with_libtpu_prints_no_tpu_errors():
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    # main() sets the environment up first; then jax starts its backends and libtpu loads for a
    # virtual topology, as in compile-check
    code = ("import os; from tpustack.cli import main; rc = main(['frobnicate']); import jax; "
            "from jax.experimental import topologies; "
            "n = len(topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2').devices); "
            "print(rc, os.environ.get('JAX_PLATFORMS'), jax.default_backend(), n)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "2 cpu cpu 4", result.stderr[-2000:]
    lines = result.stderr.splitlines()  # our own one-line error, and nothing from libtpu
    assert len(lines) == 1 and "invalid choice: 'frobnicate'" in lines[0], result.stderr[-2000:]
    # an explicit JAX_PLATFORMS, even empty, is left to jax
    code = "import os; from tpustack.cli import main; main(['frobnicate']); print(repr(os.environ['JAX_PLATFORMS']))"
    kept = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**env, "JAX_PLATFORMS": ""},
                          capture_output=True, text=True, timeout=60)
    assert kept.stdout.strip() == "''", kept.stderr[-2000:]
