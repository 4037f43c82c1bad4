"""The orbax serving export: params only (float, or weight-only int8/int4) plus the model
config as JSON, readable by plain orbax and numpy without tpustack.

    OUT/params/             an orbax PyTree checkpoint of the unrolled param tree
                            ({"embedding": [V, D], "layer_0": {"attn": {"q": [D, N, H], ...}}, ...})
    OUT/model_config.json   {"format": FORMAT, "model": ModelConfig fields, "tokenizer": ...}
    OUT/tokenizer.json      when the checkpoint had a Hugging Face tokenizer

A server without tpustack restores it with orbax alone (tests/test_export.py does so in a
process that never imports tpustack):

    meta = ocp.PyTreeCheckpointer().metadata(OUT + "/params")
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta.item_metadata.tree)
    params = ocp.PyTreeCheckpointer().restore(OUT + "/params", restore_args=args)

`load_weights` reads the directory too, straight into any mesh's shardings (orbax reads
each device's slice), so the mesh at export and at load need not agree. A quantized tree
is the one `model.weight_quant` describes (tpustack.model.quant): `<w>_int8` + `<w>_scale`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from flax import linen as nn

from tpustack import paths
from tpustack.config import ModelConfig
from tpustack.data import ByteTokenizer, HFTokenizer, load_tokenizer
from tpustack.errors import UserError
from tpustack.model import abstract_params
from tpustack.model.quant import quantize_params

FORMAT = "tpustack-orbax-params/1"
CONFIG_FILE = "model_config.json"
TYPES = ("f32", "int8", "int4")  # --type: f32 keeps float params; int8/int4 quantize the matmul weights


def _abs(path: str) -> str:
    return path if paths.is_remote(path) else os.path.abspath(path)


def is_orbax_export(path: str) -> bool:
    """Whether `path` is a directory this module wrote."""
    return paths.isfile(paths.join(path, CONFIG_FILE)) and paths.isdir(paths.join(path, "params"))


def _tensor_params(params: Any, cfg: ModelConfig, tensor_type: str | None) -> tuple[Any, ModelConfig]:
    """The params in the requested type: quantized ones go as they are; float ones are kept
    (None, f32) or quantized (int8, int4)."""
    if tensor_type is not None and tensor_type not in TYPES:
        raise UserError(f"--type {tensor_type!r}: the orbax format writes one of {', '.join(TYPES)}")
    if cfg.weight_quant != "none":
        if tensor_type not in (None, cfg.weight_quant):
            raise UserError(f"--type {tensor_type!r}: the checkpoint is already {cfg.weight_quant}; "
                            f"omit --type to export it as it is")
        return params, cfg
    if tensor_type in (None, "f32"):
        return params, cfg
    return quantize_params(params, tensor_type), dataclasses.replace(cfg, weight_quant=tensor_type)


def save_orbax_export(out: str, params: Any, cfg: ModelConfig, tokenizer: Any,
                      tensor_type: str | None = None) -> list[str]:
    """Write params (unrolled, optionally quantized) + model_config.json [+ tokenizer.json]; the paths written."""
    if cfg.scan_layers:
        raise ValueError("save_orbax_export wants unrolled params (load_weights gives them)")
    params, cfg = _tensor_params(params, cfg, tensor_type)
    paths.makedirs(out)
    target = paths.join(_abs(out), "params")
    checkpointer = ocp.PyTreeCheckpointer()
    checkpointer.save(paths.as_path(target), params)
    written = [paths.join(out, "params"), paths.join(out, CONFIG_FILE)]
    tok_name = "byte" if isinstance(tokenizer, ByteTokenizer) else None
    if isinstance(tokenizer, HFTokenizer):
        tok_name = "tokenizer.json"
        written.append(paths.join(out, tok_name))
        paths.write_bytes(written[-1], paths.read_bytes(tokenizer.path))
    meta = {"format": FORMAT, "model": dataclasses.asdict(cfg), "tokenizer": tok_name}
    paths.write_text(written[1], json.dumps(meta, indent=2))
    return written


def load_orbax_export(path: str, shardings_of: Callable[[ModelConfig], Any]) -> tuple[ModelConfig, Any, Any]:
    """(cfg, params, tokenizer) of an orbax export, each array read into shardings_of(cfg)."""
    meta = json.loads(paths.read_text(paths.join(path, CONFIG_FILE)))
    if meta.get("format") != FORMAT:
        raise UserError(f"--checkpoint {path!r}: {CONFIG_FILE} has format {meta.get('format')!r}, "
                        f"not {FORMAT!r}; re-export it with this tpustack")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    cfg = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    shardings = shardings_of(cfg)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.meta.unbox(abstract_params(cfg)), shardings)
    args = jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=t.sharding, global_shape=t.shape, dtype=t.dtype),
                        target)
    params = ocp.PyTreeCheckpointer().restore(paths.as_path(paths.join(_abs(path), "params")),
                                              item=target, restore_args=args)
    tok = meta.get("tokenizer")
    tokenizer = None if tok is None else load_tokenizer("byte" if tok == "byte" else paths.join(path, tok))
    return cfg, params, tokenizer
