"""Configs: load an ml_collections file, apply `--config.a.b=value` overrides, validate.

A config file defines `get_config(arg: str | None) -> ConfigDict` with the sections
`model`, `mesh`, `train`, `data`, `checkpoint`. After overrides the dict is locked and
converted into frozen, typed dataclasses; library code only ever sees those.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import os
from typing import Any

import ml_collections

from tpustack.errors import UserError

DTYPES = ("float32", "bfloat16", "float16")
PRECISIONS = ("f32", "bf16", "fp16")


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
    param_dtype: str = "float32"  # the master copy the optimizer updates
    dtype: str = "float32"  # the compute dtype of matmuls and activations
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
    """The shared recipe of full-size Llama configs: fp32 master weights, bf16 compute, scanned
    layers with full remat, AdamW 3e-4 with 2k warmup. Config files set only the shape."""
    cfg = default_config_dict()
    cfg.name = name
    cfg.model.update(vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
                     num_kv_heads=num_kv_heads, ffn_dim=ffn_dim, rope_theta=rope_theta, max_seq_len=max_seq_len,
                     tie_embeddings=False, param_dtype="float32", dtype="bfloat16", scan_layers=True,
                     remat_policy="nothing_saveable")
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
    cfg = module.get_config(arg or None)
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise UserError(f"--config: {path}: get_config must return an ml_collections.ConfigDict")
    return cfg


def _parse_value(key: str, text: str, current: Any) -> Any:
    """Parse an override string into the type of the field it replaces."""
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low in ("true", "1", "yes"):
                return True
            if low in ("false", "0", "no"):
                return False
            raise ValueError
        if isinstance(current, int):
            return int(float(text)) if "e" in text.lower() else int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str) or current is None:
            return text
        if isinstance(current, (tuple, list)):
            value = ast.literal_eval(text)
            return type(current)(value if isinstance(value, (tuple, list)) else (value,))
    except (ValueError, SyntaxError):
        kind = type(current).__name__
        raise UserError(f"--config.{key}={text!r}: expected a {kind} like {current!r}") from None
    return ast.literal_eval(text)


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
        node[leaf] = _parse_value(key, text, node[leaf])


def to_config(cfg: ml_collections.ConfigDict) -> Config:
    """Convert a ConfigDict into typed dataclasses, rejecting unknown or invalid fields."""
    sections = {}
    for section, cls in _SECTIONS.items():
        given = dict(cfg.get(section, ml_collections.ConfigDict()).to_dict())
        names = {f.name for f in dataclasses.fields(cls)}
        for key in given:
            if key not in names:
                raise UserError(f"config.{section}.{key}: unknown field; known: {', '.join(sorted(names))}")
        sections[section] = cls(**given)
    config = Config(name=str(cfg.get("name", "tpustack")), **sections)
    validate(config)
    return config


def validate(config: Config) -> None:
    """Checks that need no devices; mesh-size checks live in mesh.py."""
    m, t, d = config.model, config.train, config.data

    def need(cond: bool, field: str, msg: str) -> None:
        if not cond:
            raise UserError(f"config.{field}: {msg}")

    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "ffn_dim"):
        need(getattr(m, name) > 0, f"model.{name}", f"must be positive, got {getattr(m, name)}")
    need(m.num_heads % m.num_kv_heads == 0, "model.num_kv_heads",
         f"{m.num_kv_heads} must divide model.num_heads={m.num_heads}")
    need(m.head_dim > 0 or m.d_model % m.num_heads == 0, "model.head_dim",
         f"d_model={m.d_model} is not divisible by num_heads={m.num_heads}; set head_dim explicitly")
    need(m.heads_dim % 2 == 0, "model.head_dim", f"RoPE needs an even head_dim, got {m.heads_dim}")
    need(m.param_dtype in DTYPES, "model.param_dtype", f"{m.param_dtype!r} is not one of {DTYPES}")
    need(m.dtype in DTYPES, "model.dtype", f"{m.dtype!r} is not one of {DTYPES}")
    need(m.remat_policy == "none" or m.remat_policy in _checkpoint_policies(), "model.remat_policy",
         f"{m.remat_policy!r} is not 'none' or a jax.checkpoint_policies name ({', '.join(_checkpoint_policies())})")
    need(m.attention_impl in ("xla", "cudnn", "pallas", "auto"), "model.attention_impl",
         f"{m.attention_impl!r} is not one of xla, cudnn, pallas, auto")
    need(m.weight_quant in ("none", "int8", "int4"), "model.weight_quant",
         f"{m.weight_quant!r} is not one of none, int8, int4")
    need(m.matmul_impl in ("auto", "pallas", "xla", "reference"), "model.matmul_impl",
         f"{m.matmul_impl!r} is not one of auto, pallas, xla, reference")
    if m.weight_quant == "int4":
        widths = {"d_model": m.d_model, "ffn_dim": m.ffn_dim, "num_heads * head_dim": m.num_heads * m.heads_dim}
        for name, width in widths.items():
            need(width % 256 == 0, "model.weight_quant", f"int4 packs rows i and i + K/2 in 128-row groups: "
                 f"{name}={width} must be a multiple of 256; use int8")
    need(t.precision in PRECISIONS, "train.precision", f"{t.precision!r} is not one of {PRECISIONS}")
    need(t.steps >= 0, "train.steps", f"must be >= 0, got {t.steps}")
    need(t.seq_len <= m.max_seq_len, "train.seq_len",
         f"{t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    need(t.grad_accum >= 1 and t.batch_size % t.grad_accum == 0, "train.grad_accum",
         f"{t.grad_accum} must be >= 1 and divide train.batch_size={t.batch_size}")
    need(d.source in ("builtin", "text", "jsonl", "bin"), "data.source",
         f"{d.source!r} is not one of builtin, text, jsonl, bin")
    need(d.source == "builtin" or bool(d.path), "data.path", f"data.source={d.source!r} needs a path")
    need(0.0 < d.heldout_fraction < 0.5, "data.heldout_fraction", f"{d.heldout_fraction} not in (0, 0.5)")
    p, mesh = config.parallel, config.mesh
    need(p.zero_stage in (0, 1, 2, 3), "parallel.zero_stage", f"{p.zero_stage} is not one of 0, 1, 2, 3")
    need(p.microbatches >= 1, "parallel.microbatches", f"must be >= 1, got {p.microbatches}")
    if mesh.stage * mesh.dcn_stage > 1:
        stages = mesh.stage * mesh.dcn_stage
        need(m.scan_layers, "model.scan_layers", "pipeline stages (mesh.stage > 1) split the stacked layers: "
             "set --config.model.scan_layers=True")
        need(m.num_layers % stages == 0, "mesh.stage",
             f"{stages} stages must divide model.num_layers={m.num_layers}")
        need(p.pipeline_repeats >= 1 and m.num_layers % (stages * p.pipeline_repeats) == 0,
             "parallel.pipeline_repeats", f"{p.pipeline_repeats} repeats x {stages} stages must divide "
             f"model.num_layers={m.num_layers}")
        need(p.pipeline_repeats == 1 or p.microbatches % stages == 0, "parallel.microbatches",
             f"a circular pipeline (pipeline_repeats > 1) needs microbatches ({p.microbatches}) to be a "
             f"multiple of the {stages} stages")
        need(t.batch_size % (t.grad_accum * p.microbatches) == 0, "parallel.microbatches",
             f"{p.microbatches} microbatches x train.grad_accum={t.grad_accum} must divide "
             f"train.batch_size={t.batch_size}")
    for axis in ("data", "stage", "fsdp", "tensor"):
        need(getattr(mesh, f"dcn_{axis}") >= 1, f"mesh.dcn_{axis}", "DCN sizes are >= 1 (1: within a slice)")
    need(0.0 <= config.distill.alpha <= 1.0, "distill.alpha", f"{config.distill.alpha} not in [0, 1]")
    need(config.distill.temperature > 0, "distill.temperature", f"{config.distill.temperature} must be > 0")


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
    """Inverse of config_to_dict."""
    cfg = ml_collections.ConfigDict(data)
    return to_config(cfg)
