"""Field-by-field checks of a config: each field's type and range written once, in one table,
and the checks that relate fields. config.to_config runs them on every config it builds.

Typed against the dataclasses by duck typing, so this module sits below tpustack.config.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable

from tpustack.errors import UserError
from tpustack.remat import SAVED_PROJECTIONS, is_policy

DTYPES = ("float32", "bfloat16", "float16")
# train.precision -> the compute dtype of matmuls and activations; master weights stay float32
# (fp8: the linears' matmuls take e4m3 operands and e5m2 gradients, tpustack.model.fp8; the rest runs bf16)
COMPUTE_DTYPE = {"f32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp8": "bfloat16"}
PRECISIONS = tuple(COMPUTE_DTYPE)
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")  # the linears model.lora_targets may name


_INT_LIMIT = 2**31 - 1
_WIDE_INTS = {"data.max_bytes": 2**62}  # host-side only: no int32 limit


@dataclasses.dataclass(frozen=True)
class Check:
    """A field's constraint: `ok(value)`, and what to say when it fails (`{v}`: the value)."""

    ok: Callable[[Any], bool]
    says: str


def _at_least(lo: float, note: str = "") -> Check:
    return Check(lambda v: v >= lo, f"must be >= {lo}, got {{v!r}}{note}")


def _above(lo: float, note: str = "") -> Check:
    return Check(lambda v: v > lo, f"must be > {lo}, got {{v!r}}{note}")


def _within(lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False, note: str = "") -> Check:
    def ok(v):
        return (v > lo if open_lo else v >= lo) and (v < hi if open_hi else v <= hi)

    return Check(ok, f"{{v!r}} is not in {'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}{note}")


def _one_of(*choices: Any, note: str = "") -> Check:
    return Check(lambda v: v in choices, f"{{v!r}} is not one of {', '.join(map(str, choices))}{note}")


_ONE = _at_least(1)
_MESH_AXIS = Check(lambda v: v == -1 or v >= 1, "must be >= 1, or -1 to fill the devices the other axes "
                                                "leave, got {v!r}")
_DCN_AXIS = _at_least(1, " (1: within a slice)")

# One entry per field of every section; None: any value of the declared type.
FIELD_CHECKS: dict[str, Check | None] = {
    "name": Check(bool, "must not be empty (runs/NAME is the default workdir)"),
    "model.vocab_size": _ONE, "model.d_model": _ONE, "model.num_layers": _ONE, "model.num_heads": _ONE,
    "model.num_kv_heads": _ONE, "model.head_dim": _at_least(0, "; 0 derives it as d_model // num_heads"),
    "model.ffn_dim": _ONE, "model.rope_theta": _above(0), "model.norm_eps": _above(0),
    "model.tie_embeddings": None, "model.max_seq_len": _ONE, "model.init_std": _above(0),
    "model.param_dtype": Check(lambda v: v == "float32", "{v!r}: the master copy the optimizer updates is "
                                                         "always float32; drop the setting (train.precision sets "
                                                         "the compute dtype)"),
    "model.dtype": _one_of(*DTYPES, note="; train.precision sets it"), "model.scan_layers": None,
    "model.remat_policy": Check(is_policy, "{v!r} is not 'none', " + ", ".join(SAVED_PROJECTIONS)
                                + " or a jax.checkpoint_policies name (such as nothing_saveable, "
                                  "dots_with_no_batch_dims_saveable)"),
    "model.attention_impl": _one_of("xla", "cudnn", "pallas", "auto"),
    "model.weight_quant": _one_of("none", "int8", "int4", "nf4", "int4_zp"),
    "model.weight_group": _one_of(32, 64, 128, 256),
    "model.matmul_impl": _one_of("auto", "pallas", "xla", "reference"),
    "model.decode_kernels": _one_of("auto", "xla"),
    "model.lora_rank": _at_least(0, "; 0: no adapters"), "model.lora_alpha": _above(0),
    "model.lora_targets": Check(lambda v: bool(v) and set(v.split(",")) <= set(LORA_TARGETS),
                                f"{{v!r}}: comma-separated names from {','.join(LORA_TARGETS)}"),
    "mesh.data": _MESH_AXIS, "mesh.stage": _MESH_AXIS, "mesh.fsdp": _MESH_AXIS, "mesh.tensor": _MESH_AXIS,
    "mesh.dcn_data": _DCN_AXIS, "mesh.dcn_stage": _DCN_AXIS, "mesh.dcn_fsdp": _DCN_AXIS,
    "mesh.dcn_tensor": _DCN_AXIS,
    "mesh.rules": None,  # mesh.rules_for owns the tables and names them (mesh.py imports this module)
    "parallel.zero_stage": _one_of(0, 1, 2, 3), "parallel.microbatches": _ONE,
    "parallel.pipeline_repeats": _at_least(1, " (1: GPipe)"),
    "train.steps": _at_least(0), "train.batch_size": _ONE, "train.seq_len": _ONE, "train.grad_accum": _ONE,
    "train.lr": _above(0), "train.warmup_steps": _at_least(0), "train.min_lr_ratio": _within(0, 1),
    "train.weight_decay": _at_least(0), "train.b1": _within(0, 1, open_hi=True),
    "train.b2": _within(0, 1, open_hi=True), "train.eps": _above(0, " (Adam divides by sqrt(v) + eps)"),
    "train.clip_norm": _at_least(0, "; 0 disables clipping"), "train.precision": _one_of(*PRECISIONS),
    "train.loss_scale_init": _at_least(1, " (fp16 loss scaling never goes below 1)"),
    "train.loss_scale_growth_interval": _ONE, "train.seed": _at_least(0),
    "train.log_every": _at_least(1, " (steps between progress lines)"),
    "train.eval_every": _at_least(0, "; 0 disables the periodic evals"),
    "train.eval_batches": _at_least(1, " (the held-out loss averages this many batches; train.eval_every=0 "
                                       "disables the periodic evals)"),
    "train.time_limit_s": _at_least(0, "; 0: no limit"), "train.samples": _at_least(0, "; 0: none"),
    "train.sample_len": _ONE,
    "data.source": _one_of("builtin", "builtin_text", "text", "jsonl", "bin"), "data.path": None,
    "data.tokenizer": Check(bool, "must be 'byte' or a path to a Hugging Face tokenizer.json, got {v!r}"),
    "data.bin_dtype": _one_of("uint16", "uint32"), "data.max_bytes": _ONE,
    "data.heldout_fraction": _within(0, 0.5, open_lo=True, open_hi=True),
    "checkpoint.every": _at_least(0, "; 0 disables periodic saves"),
    "checkpoint.keep": _at_least(1, "; to save less often raise checkpoint.every (0 disables periodic saves)"),
    "checkpoint.async_save": None,
    "distill.teacher": None, "distill.alpha": _within(0, 1), "distill.temperature": _above(0),
}

_KIND = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}


def typed(field: str, value: Any, kind: type) -> Any:
    """`value` as a `kind` (bool, int, float, str), never truncated; a UserError otherwise."""
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        value = int(value) if ok else value
    elif kind is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise UserError(f"config.{field}: expected {_KIND.get(kind, kind.__name__)}, got {value!r}")
    limit = _WIDE_INTS.get(field, _INT_LIMIT)
    if kind is int and abs(value) > limit:
        raise UserError(f"config.{field}: {value} is out of range (at most {limit})")
    return value




def check_field(field: str, value: Any, kind: type) -> None:
    """One field's declared type, then its FIELD_CHECKS entry."""
    typed(field, value, kind)
    check = FIELD_CHECKS[field]
    if check is not None and not check.ok(value):
        raise UserError(f"config.{field}: {check.says.format(v=value)}")


def _need(cond: bool, field: str, msg: str) -> None:
    if not cond:
        raise UserError(f"config.{field}: {msg}")


def check_relations(config) -> None:
    """The checks that relate fields of a Config."""
    m, t, d = config.model, config.train, config.data

    compute = COMPUTE_DTYPE[t.precision]
    precision_of = {dtype: p for p, dtype in reversed(COMPUTE_DTYPE.items())}  # bfloat16 -> bf16, not fp8
    _need(m.dtype in ("float32", compute), "model.dtype",
         f"{m.dtype!r} contradicts train.precision={t.precision!r}, whose compute dtype is {compute}; "
         f"drop model.dtype (train.precision sets it) or set train.precision={precision_of[m.dtype]!r}")
    if t.precision == "fp8":
        _need(m.weight_quant == "none", "train.precision", f"fp8 trains float weights; model.weight_quant="
              f"{m.weight_quant!r} is for serving: drop it or train with bf16")
        _need(config.mesh.stage * config.mesh.dcn_stage == 1, "train.precision",
              "fp8 does not run under the pipeline schedule yet; use mesh.stage=1 or train.precision=bf16")
    _need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
         f"{m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    _need(m.head_dim > 0 or m.d_model % m.num_heads == 0, "model.head_dim",
         f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}; set head_dim explicitly")
    _need(m.heads_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {m.heads_dim}")
    if m.weight_quant == "int4":
        widths = {"d_model": m.d_model, "ffn_dim": m.ffn_dim, "num_heads * head_dim": m.num_heads * m.heads_dim}
        for name, width in widths.items():
            _need(width % 256 == 0, "model.weight_quant", f"int4 packs rows i and i + K/2 in 128-row groups: "
                 f"{name}={width} must be a multiple of 256; use int8")
    _need(t.seq_len <= m.max_seq_len, "train.seq_len",
         f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; shorten it or raise model.max_seq_len")
    _need(t.batch_size % t.grad_accum == 0, "train.grad_accum",
         f"{t.grad_accum} must divide train.batch_size={t.batch_size}")
    _need(d.source.startswith("builtin") or bool(d.path), "data.path", f"data.source={d.source!r} needs a path")
    p, mesh = config.parallel, config.mesh
    if mesh.stage * mesh.dcn_stage > 1:
        stages = mesh.stage * mesh.dcn_stage
        _need(m.scan_layers, "model.scan_layers", "pipeline stages (mesh.stage > 1) split the stacked layers: "
             "set --config.model.scan_layers=True")
        _need(m.num_layers % stages == 0, "mesh.stage",
             f"{stages} stages must divide model.num_layers={m.num_layers}")
        _need(m.num_layers % (stages * p.pipeline_repeats) == 0, "parallel.pipeline_repeats",
             f"{p.pipeline_repeats} repeats x {stages} stages must divide model.num_layers={m.num_layers}")
        _need(p.pipeline_repeats == 1 or p.microbatches % stages == 0, "parallel.microbatches",
             f"a circular pipeline (pipeline_repeats > 1) needs microbatches ({p.microbatches}) to be a "
             f"multiple of the {stages} stages")
        _need(t.batch_size % (t.grad_accum * p.microbatches) == 0, "parallel.microbatches",
             f"{p.microbatches} microbatches x train.grad_accum={t.grad_accum} must divide "
             f"train.batch_size={t.batch_size}")
