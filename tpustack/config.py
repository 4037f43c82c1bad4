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
import os
import typing
from typing import Any

import ml_collections

from tpustack.config_checks import COMPUTE_DTYPE, FIELD_CHECKS, check_field, check_relations, typed  # noqa: F401 - COMPUTE_DTYPE, FIELD_CHECKS re-exported
from tpustack.errors import UserError


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
    # decoding with a KV cache on a CPU backend: auto = tpustack's native CPU kernels where they
    # apply (kernels.matmul for 1-8 rows, paged attention reading the cache in place), xla = XLA's
    # ops only. Passes without a cache (training, scoring) always use XLA.
    decode_kernels: str = "auto"
    weight_group: int = 128  # input rows per scale/zero point of weight_quant=int4_zp (tpustack quantize)
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on the lora_targets linears (tpustack finetune)
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_targets: str = "q,k,v,o,gate,up,down"  # comma-separated linears that get adapters (QLoRA: all)

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
    source: str = "builtin"  # builtin (stdlib .py) | builtin_text (stdlib .txt/.rst/.html) | text | jsonl | bin
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
assert FIELD_CHECKS.keys() == _FIELD_TYPES.keys(), "every config field needs an entry in FIELD_CHECKS"


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
        sections[section] = cls(**{k: typed(f"{section}.{k}", v, _FIELD_TYPES[f"{section}.{k}"])
                                   for k, v in given.items()})
    config = Config(name=typed("name", cfg.get("name", "tpustack"), str), **sections)
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
    """Every field's type and range (config_checks.FIELD_CHECKS), then the checks that relate
    fields; mesh-size checks that need the device count live in mesh.py."""
    for field, value in _fields(config):
        check_field(field, value, _FIELD_TYPES[field])
    check_relations(config)


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
