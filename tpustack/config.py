"""Configs: load an ml_collections file, apply `--config.a.b=value` overrides, validate.

A config file defines `get_config(arg: str | None) -> ConfigDict` with the sections
`model`, `mesh`, `train`, `data`, `checkpoint` (`distill`, `parallel` optional). After
overrides the dict is locked and converted into frozen, typed dataclasses; library code
only ever sees those. All of it is checked before a device or a workdir is touched, and
every failure is one UserError naming the field and the fix:

1. An override is parsed into its dataclass field's declared type: ints must be whole
   numbers ("1e5" is fine; "2.5" and "1e400" are errors, never truncated). ConfigDict's
   own type safety backs this up: assigning a float to an int field raises TypeError, in
   a config file or an override. We do not use `ml_collections.config_flags`: it defines
   absl flags on the global FLAGS and parses sys.argv itself, while our CLI is argparse
   with subcommands and hands overrides over as a dict; its int parser (absl's
   IntegerParser) also rejects "1e5". The convention is the same: the field's type
   chooses the parser.
2. Every field of every section has one entry in FIELD_CHECKS: its range or choices
   (None: any value of the declared type). Floats must be finite; ints are at most
   2**31 - 1 (steps and seeds become int32 scalars on device; no size comes near it),
   unless listed in _WIDE_INTS.
3. `validate` adds the checks that relate fields (divisibility, pipeline shapes, context).
4. Precision is settled here, once: model.dtype := COMPUTE_DTYPE[train.precision] and
   model.param_dtype := float32 (the master copy the optimizer updates), so a workdir
   trained in bf16 decodes in bf16 whichever command loads it. A config may leave
   model.dtype at float32 (the default) or set the precision's own dtype; anything else
   contradicts train.precision and is an error. Saved configs of old checkpoints did not
   settle it (training applied the precision at each use), so config_from_dict drops the
   two derived fields and settles them again from train.precision.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import numbers
import os
import typing
from typing import Any, Callable

import ml_collections

from tpustack.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
# train.precision -> the compute dtype of matmuls and activations; master weights stay float32
COMPUTE_DTYPE = {"f32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = tuple(COMPUTE_DTYPE)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 384
    d_model: int = 256
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int = 0  # 0: d_model // num_heads
    ffn_dim: int = 688
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    param_dtype: str = "float32"  # the master copy the optimizer updates; always float32
    dtype: str = "float32"  # the compute dtype of matmuls and activations; to_config sets it from train.precision
    scan_layers: bool = False  # lax.scan over stacked layer weights
    remat_policy: str = "none"  # "none" or a jax.checkpoint_policies name
    attention_impl: str = "xla"  # xla (einsum) | cudnn | pallas (tpustack.kernels) | auto (pallas on TPU/GPU)
    weight_quant: str = "none"  # none | int8 | int4: weight-only quantized matmuls (serving)
    matmul_impl: str = "auto"  # impl= of the quantized matmul kernels: auto | pallas | xla | reference

    @property
    def heads_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def num_params(self) -> int:
        """Number of parameters, embeddings included."""
        d, h = self.d_model, self.heads_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        mlp = 3 * d * self.ffn_dim
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * per_layer + d + head


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the mesh axes inside one slice (ICI) and across slices (DCN, multislice).

    An axis's total size is its ICI size times its DCN size; DCN sizes multiply to the
    number of slices. Usual multislice layouts put only `data` (or `fsdp`) across slices.
    """

    data: int = 1
    stage: int = 1  # pipeline stages (needs model.scan_layers)
    fsdp: int = -1  # -1 fills the devices the other axes leave
    tensor: int = 1
    dcn_data: int = 1
    dcn_stage: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    rules: str = "default"  # which table in mesh.RULES


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    zero_stage: int = 3  # over the fsdp axis: 0 replicate all, 1 + shard Adam, 2 + grads, 3 + params
    microbatches: int = 4  # pipeline (mesh.stage > 1): microbatches per step
    pipeline_repeats: int = 1  # 1: GPipe; V > 1: circular, V layer chunks per stage, bubble / V


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # global, in sequences
    seq_len: int = 256
    grad_accum: int = 1  # microbatches per step
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    precision: str = "f32"  # f32 | bf16 (fp32 master, bf16 compute) | fp16 (+ loss scaling)
    loss_scale_init: float = 2.0**15
    loss_scale_growth_interval: int = 2000  # clean steps before the scale doubles
    seed: int = 0
    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 8
    time_limit_s: float = 0.0  # >0: stop (and checkpoint) once training has run this long
    samples: int = 2  # samples printed after training
    sample_len: int = 200


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "builtin"  # builtin | text | jsonl | bin
    path: str = ""  # file or directory for text/jsonl/bin; a glob is allowed
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer.json
    bin_dtype: str = "uint16"  # dtype of pre-tokenized .bin files
    max_bytes: int = 24_000_000  # cap on the text read (builtin/text/jsonl)
    heldout_fraction: float = 0.02


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500  # steps between saves; 0 disables periodic saves
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher: str = ""  # a tpustack workdir; set: train the model as a student of that teacher
    alpha: float = 0.5  # weight of the hard-label cross-entropy; 1 - alpha goes to the KL term
    temperature: float = 2.0


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    mesh: MeshConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    distill: DistillConfig = DistillConfig()
    parallel: ParallelConfig = ParallelConfig()
    name: str = "tpustack"


_SECTIONS = {
    "model": ModelConfig,
    "mesh": MeshConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "distill": DistillConfig,
    "parallel": ParallelConfig,
}


# Every field's declared type, "section.field" -> bool | int | float | str.
_FIELD_TYPES: dict[str, type] = {"name": str} | {
    f"{section}.{name}": kind for section, cls in _SECTIONS.items()
    for name, kind in typing.get_type_hints(cls).items()}
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
    "model.remat_policy": Check(lambda v: v == "none" or v in _checkpoint_policies(),
                                "{v!r} is not 'none' or a jax.checkpoint_policies name (such as "
                                "nothing_saveable, dots_saveable)"),
    "model.attention_impl": _one_of("xla", "cudnn", "pallas", "auto"),
    "model.weight_quant": _one_of("none", "int8", "int4"),
    "model.matmul_impl": _one_of("auto", "pallas", "xla", "reference"),
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
    "data.source": _one_of("builtin", "text", "jsonl", "bin"), "data.path": None,
    "data.tokenizer": Check(bool, "must be 'byte' or a path to a Hugging Face tokenizer.json, got {v!r}"),
    "data.bin_dtype": _one_of("uint16", "uint32"), "data.max_bytes": _ONE,
    "data.heldout_fraction": _within(0, 0.5, open_lo=True, open_hi=True),
    "checkpoint.every": _at_least(0, "; 0 disables periodic saves"),
    "checkpoint.keep": _at_least(1, "; to save less often raise checkpoint.every (0 disables periodic saves)"),
    "checkpoint.async_save": None,
    "distill.teacher": None, "distill.alpha": _within(0, 1), "distill.temperature": _above(0),
}
assert FIELD_CHECKS.keys() == _FIELD_TYPES.keys(), "every config field needs an entry in FIELD_CHECKS"

_KIND = {bool: "true or false", int: "a whole number", float: "a finite number", str: "a string"}


def _typed(field: str, value: Any, kind: type) -> Any:
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


def default_config_dict() -> ml_collections.ConfigDict:
    """A ConfigDict holding every field at its default; config files start from it."""
    cfg = ml_collections.ConfigDict()
    cfg.name = "tpustack"
    for section, cls in _SECTIONS.items():
        cfg[section] = ml_collections.ConfigDict(dataclasses.asdict(cls()))
    return cfg


def full_size_config_dict(name: str, *, vocab_size: int, d_model: int, num_layers: int, num_heads: int,
                          num_kv_heads: int, ffn_dim: int, rope_theta: float, max_seq_len: int,
                          batch_size: int = 256, seq_len: int | None = None) -> ml_collections.ConfigDict:
    """The shared recipe of full-size Llama configs: bf16 precision (fp32 master weights, bf16 compute),
    scanned layers with full remat, AdamW 3e-4 with 2k warmup. Config files set only the shape."""
    cfg = default_config_dict()
    cfg.name = name
    cfg.model.update(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, ffn_dim=ffn_dim, rope_theta=rope_theta, max_seq_len=max_seq_len,
                     tie_embeddings=False, scan_layers=True, remat_policy="nothing_saveable")
    cfg.train.update(precision="bf16", batch_size=batch_size, seq_len=seq_len or max_seq_len, lr=3e-4,
                     warmup_steps=2000, steps=100000)
    return cfg


def load_config_dict(spec: str) -> ml_collections.ConfigDict:
    """Load `path.py[:arg]` and call its get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--config: no such file {path!r}; pass a config file such as configs/tiny.py")
    module_spec = importlib.util.spec_from_file_location("_tpustack_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise UserError(f"--config: {path} defines no get_config(arg); add one returning a ConfigDict")
    try:
        cfg = module.get_config(arg or None)
    except TypeError as e:  # ConfigDict's type safety: a float assigned to an int field, say
        raise UserError(f"--config: {path}: {e}") from None
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"--config: {path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parse an override string into the declared type of its field (else the type it replaces)."""
    kind = _FIELD_TYPES.get(key, type(current))
    try:
        if kind is bool:
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            try:
                return int(text)
            except ValueError:
                number = float(text)  # "1e5"
        elif kind is float:
            return float(text)
        elif kind is str or current is None:
            return text
        elif isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            return type(current)(value if isinstance(value, (tuple, list)) else (value,))
        else:
            return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise UserError(f"--config.{key}={text!r}: expected a {kind.__name__} like {current!r}") from None
    if not number.is_integer():  # 2.5, inf, nan: never truncated
        raise UserError(f"--config.{key}={text!r}: expected a whole number like {current!r}")
    return int(number)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Apply {"model.num_layers": "4"} overrides; an unknown key is an error naming it."""
    for key, text in overrides.items():
        node = cfg
        parts = key.split(".")
        for i, part in enumerate(parts):
            known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
            if part not in known:
                prefix = ".".join(parts[:i])
                close = difflib.get_close_matches(part, known, n=1)
                hint = f"; did you mean {'.'.join([*parts[:i], close[0]])}?" if close else ""
                where = f"config.{prefix}" if prefix else "config"
                raise UserError(f"--config.{key}: unknown key {part!r} in {where}{hint}")
            if i < len(parts) - 1:
                node = node[part]
        leaf = parts[-1]
        if isinstance(node[leaf], ml_collections.ConfigDict):
            raise UserError(f"--config.{key}: is a section; override one of its fields instead")
        try:
            node[leaf] = _parse_value(key, text, node[leaf])
        except TypeError as e:  # ConfigDict's type safety: the config file gave the field another type
            raise UserError(f"--config.{key}={text!r}: {e}") from None


def to_config(cfg: ml_collections.ConfigDict) -> Config:
    """Convert a ConfigDict into typed dataclasses, rejecting unknown or invalid fields and
    settling model.dtype / model.param_dtype from train.precision."""
    for key in cfg.keys():
        if key != "name" and key not in _SECTIONS:
            raise UserError(f"config.{key}: unknown section; known: name, {', '.join(_SECTIONS)}")
    sections = {}
    for section, cls in _SECTIONS.items():
        node = cfg.get(section, None)
        if node is None:
            node = {}
        if not isinstance(node, (ml_collections.ConfigDict, dict)):
            raise UserError(f"config.{section}: is a section of fields, got {node!r}")
        given = dict(node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node)
        names = {f.name for f in dataclasses.fields(cls)}
        for key in given:
            if key not in names:
                raise UserError(f"config.{section}.{key}: unknown field; known: {', '.join(sorted(names))}")
        sections[section] = cls(**{k: _typed(f"{section}.{k}", v, _FIELD_TYPES[f"{section}.{k}"])
                                   for k, v in given.items()})
    config = Config(name=_typed("name", cfg.get("name", "tpustack"), str), **sections)
    validate(config)
    model = dataclasses.replace(config.model, dtype=COMPUTE_DTYPE[config.train.precision], param_dtype="float32")
    return dataclasses.replace(config, model=model)


def _fields(config: Config):
    """("section.field", value) for every field of a Config, `name` included."""
    yield "name", config.name
    for section in _SECTIONS:
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            yield f"{section}.{f.name}", getattr(obj, f.name)


def validate(config: Config) -> None:
    """Every field's type and range (FIELD_CHECKS), then the checks that relate fields; mesh-size
    checks that need the device count live in mesh.py."""
    for field, value in _fields(config):
        _typed(field, value, _FIELD_TYPES[field])
        check = FIELD_CHECKS[field]
        if check is not None and not check.ok(value):
            raise UserError(f"config.{field}: {check.says.format(v=value)}")

    m, t, d = config.model, config.train, config.data

    def need(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise UserError(f"config.{field}: {msg}")

    compute = COMPUTE_DTYPE[t.precision]
    precision_of = {dtype: p for p, dtype in COMPUTE_DTYPE.items()}
    need(m.dtype in ("float32", compute), "model.dtype",
         f"{m.dtype!r} contradicts train.precision={t.precision!r}, whose compute dtype is {compute}; "
         f"drop model.dtype (train.precision sets it) or set train.precision={precision_of[m.dtype]!r}")
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
         f"{m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    need(m.head_dim > 0 or m.d_model % m.num_heads == 0, "model.head_dim",
         f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}; set head_dim explicitly")
    need(m.heads_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {m.heads_dim}")
    if m.weight_quant == "int4":
        widths = {"d_model": m.d_model, "ffn_dim": m.ffn_dim, "num_heads * head_dim": m.num_heads * m.heads_dim}
        for name, width in widths.items():
            need(width % 256 == 0, "model.weight_quant", f"int4 packs rows i and i + K/2 in 128-row groups: "
                 f"{name}={width} must be a multiple of 256; use int8")
    need(t.seq_len <= m.max_seq_len, "train.seq_len",
         f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}; shorten it or raise model.max_seq_len")
    need(t.batch_size % t.grad_accum == 0, "train.grad_accum",
         f"{t.grad_accum} must divide train.batch_size={t.batch_size}")
    need(d.source == "builtin" or bool(d.path), "data.path", f"data.source={d.source!r} needs a path")
    p, mesh = config.parallel, config.mesh
    if mesh.stage * mesh.dcn_stage > 1:
        stages = mesh.stage * mesh.dcn_stage
        need(m.scan_layers, "model.scan_layers", "pipeline stages (mesh.stage > 1) split the stacked layers: "
             "set --config.model.scan_layers=True")
        need(m.num_layers % stages == 0, "mesh.stage",
             f"{stages} stages must divide model.num_layers={m.num_layers}")
        need(m.num_layers % (stages * p.pipeline_repeats) == 0, "parallel.pipeline_repeats",
             f"{p.pipeline_repeats} repeats x {stages} stages must divide model.num_layers={m.num_layers}")
        need(p.pipeline_repeats == 1 or p.microbatches % stages == 0, "parallel.microbatches",
             f"a circular pipeline (pipeline_repeats > 1) needs microbatches ({p.microbatches}) to be a "
             f"multiple of the {stages} stages")
        need(t.batch_size % (t.grad_accum * p.microbatches) == 0, "parallel.microbatches",
             f"{p.microbatches} microbatches x train.grad_accum={t.grad_accum} must divide "
             f"train.batch_size={t.batch_size}")


def _checkpoint_policies() -> list[str]:
    import jax

    return sorted(n for n in dir(jax.checkpoint_policies) if not n.startswith("_"))


def load_config(spec: str, overrides: dict[str, str] | None = None) -> Config:
    """Load a config file, apply overrides, lock and validate it."""
    cfg = load_config_dict(spec)
    cfg.lock()
    apply_overrides(cfg, overrides or {})
    return to_config(cfg)


def config_to_dict(config: Config) -> dict[str, Any]:
    """A JSON-able dict of the typed config (saved beside checkpoints)."""
    return dataclasses.asdict(config)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Inverse of config_to_dict. The dtypes are derived from train.precision: older checkpoints
    saved them unsettled (training applied the precision at each use), so they are settled again."""
    model = {k: v for k, v in data.get("model", {}).items() if k not in ("dtype", "param_dtype")}
    return to_config(ml_collections.ConfigDict({**data, "model": model}))
