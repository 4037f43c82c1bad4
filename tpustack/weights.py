"""The one way in for weights: a tpustack workdir or a Hugging Face directory, local or gs://
-> (ModelConfig, params, tokenizer), placed on the caller's mesh (one device by default).

Every command that needs only weights (generate, eval, bench, serve, quantize, export, a
distillation teacher) comes through `load_weights`; none of them builds an optimizer. A
workdir's checkpoint is read params-only (checkpoint.Checkpointer.restore_params), straight
into its shardings. The params come back with unrolled layers (`layer_i`), the layout the
decode loop wants; a scanned checkpoint is split one leaf at a time, so the peak stays at
one copy of the params plus the largest leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh, SingleDeviceSharding

from tpustack import paths
from tpustack.checkpoint import Checkpointer, checkpoint_dir
from tpustack.interop.quantized_dir import is_quantized_dir, read_quantized
from tpustack.config import Config, ModelConfig, config_from_dict
from tpustack.data import load_tokenizer
from tpustack.data.chat import load_chat_template
from tpustack.errors import UserError
from tpustack.interop.hf import load_hf_checkpoint
from tpustack.interop.orbax_export import is_orbax_export, load_orbax_export
from tpustack.mesh import param_shardings, rules_for
from tpustack.model import Decoder, abstract_params


class Weights(NamedTuple):
    cfg: ModelConfig  # scan_layers False: the params are unrolled
    params: Any
    tokenizer: Any  # None when the checkpoint names none (ids only)


def weights_kind(path: str) -> str:
    """'workdir' (WORKDIR/checkpoints), 'orbax' (an orbax serving export), 'quantized' (tpustack
    quantize --out), 'hf' (config.json + *.safetensors) or 'gguf' (a .gguf file); else a UserError."""
    if path.endswith(".gguf") and paths.isfile(path):
        return "gguf"
    if is_quantized_dir(path):
        return "quantized"
    if paths.isdir(checkpoint_dir(path)):
        return "workdir"
    if is_orbax_export(path):
        return "orbax"
    if paths.isfile(paths.join(path, "config.json")):
        return "hf"
    raise UserError(f"--checkpoint {path!r}: neither a tpustack workdir (with checkpoints/), a Hugging Face "
                    f"directory (with config.json) nor a .gguf file")


def _shardings(cfg: ModelConfig, mesh: Mesh | None, rules: str) -> Any:
    """Where each param goes: by the rules table on a mesh, else whole on the first device."""
    if mesh is not None:
        return param_shardings(cfg, mesh, rules_for(rules))
    one = SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda _: one, nn.meta.unbox(abstract_params(cfg)))


def _unroll(params: dict, cfg: ModelConfig) -> tuple[dict, ModelConfig]:
    """Scanned {"layers": {"block": [L, ...]}} -> {"layer_i": ...}, freeing each stacked leaf
    once it is split, so the peak is one copy plus one leaf."""
    cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
    if "layers" not in params:
        return params, cfg
    params = dict(params)
    leaves, treedef = jax.tree.flatten(params.pop("layers")["block"])
    per_layer: list[list[Any]] = [[] for _ in range(cfg.num_layers)]
    while leaves:
        stacked = leaves.pop(0)
        for i in range(cfg.num_layers):
            per_layer[i].append(stacked[i])
        del stacked
    for i, layer in enumerate(per_layer):
        params[f"layer_{i}"] = jax.tree.unflatten(treedef, layer)
    return params, cfg


def _gguf_interop(path: str):
    """tpustack.interop.gguf, imported on use as `gguf` is an optional extra."""
    try:
        from tpustack.interop import gguf
    except ImportError as e:
        raise UserError(f"--checkpoint {path!r}: reading GGUF needs {e.name}; pip install 'tpustack[gguf]'") from None
    return gguf


def _read_gguf(path: str) -> tuple[ModelConfig, dict, Any]:
    """A GGUF file's config, f32 params and tokenizer."""
    cfg, params, tokenizer, _ = _gguf_interop(path).read_gguf(path)
    return cfg, params, tokenizer


def chat_template_of(path: str) -> tuple[str | None, str, str]:
    """(chat template or None, bos text, eos text) a checkpoint carries: an HF directory's
    tokenizer_config.json / chat_template.jinja or a GGUF file's tokenizer.chat_template; a
    tpustack workdir or export carries none (the server then uses its documented default)."""
    kind = weights_kind(path)
    if kind == "hf":
        return load_chat_template(path)
    if kind == "gguf":
        return _gguf_interop(path).read_chat_template(path)
    return None, "", ""


def load_weights(path: str, mesh: Mesh | None = None, rules: str = "default") -> Weights:
    """(ModelConfig, params, tokenizer) of a workdir's latest checkpoint, a quantized directory, an HF
    directory or a GGUF file (dequantized to f32)."""
    kind = weights_kind(path)
    if kind == "workdir":
        ckpt = Checkpointer(path, read_only=True)
        try:
            config = ckpt.config()
            params = ckpt.restore_params(config.model, _shardings(config.model, mesh, rules))
        finally:
            ckpt.close()
        params, cfg = _unroll(params, config.model)
        return Weights(cfg, params, load_tokenizer(config.data.tokenizer))
    if kind == "quantized":  # codes and scales as saved; the model runs them (model.weight_quant)
        config, host_params, _ = read_quantized(path)
        params = jax.device_put(host_params, _shardings(config.model, mesh, rules))
        return Weights(config.model, params, load_tokenizer(config.data.tokenizer))
    if kind == "orbax":  # read straight into the shardings, whatever mesh wrote it
        return Weights(*load_orbax_export(path, lambda cfg: _shardings(cfg, mesh, rules)))
    if kind == "gguf":
        cfg, host_params, tokenizer = _read_gguf(path)
    else:
        cfg, host_params = load_hf_checkpoint(path)
        tokenizer = load_tokenizer(path) if paths.isfile(paths.join(path, "tokenizer.json")) else None
    cfg = dataclasses.replace(cfg, scan_layers=False)
    params = jax.device_put(host_params, _shardings(cfg, mesh, rules))
    del host_params
    return Weights(cfg, params, tokenizer)


def source_config(path: str, cfg: ModelConfig) -> Config:
    """The run config behind a checkpoint: a workdir's own (its data and batch shape), else
    defaults around the model of an HF / GGUF / exported directory, with its tokenizer.json
    when it has one (commands that write a derived checkpoint save it beside the params)."""
    if weights_kind(path) == "workdir":
        ckpt = Checkpointer(path, read_only=True)
        try:
            return ckpt.config()
        finally:
            ckpt.close()
    tokenizer = paths.join(path, "tokenizer.json")
    return config_from_dict({"model": dataclasses.asdict(cfg),
                             "data": {"tokenizer": tokenizer if paths.isfile(tokenizer) else "byte"}})


def init_weights(cfg: ModelConfig, mesh: Mesh | None = None, seed: int = 0, rules: str = "default") -> Weights:
    """Random weights of `cfg` (benchmarks, tests), created directly in their shardings."""
    cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
    shardings = _shardings(cfg, mesh, rules)
    init = jax.jit(lambda key: nn.meta.unbox(Decoder(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]),
                   out_shardings=shardings)
    return Weights(cfg, init(jax.random.key(seed)), None)
