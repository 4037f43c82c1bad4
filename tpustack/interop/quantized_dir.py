"""The quantized checkpoint: a directory (local or gs://) that load_weights reads directly.

    quantized.json      {"config": the run's config with model.weight_quant (and weight_group)
                         set, "quantization": {method, bits, group, calib, source, ...}}
    params.safetensors  the quantized param tree (unrolled layers), keys joined by "/":
                         codes and scales as the model declares them (tpustack.model.quant)
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from flax import traverse_util
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from tpustack import paths
from tpustack.config import Config, config_from_dict, config_to_dict

CONFIG_FILE = "quantized.json"
PARAMS_FILE = "params.safetensors"


def is_quantized_dir(path: str) -> bool:
    """True when `path` holds a quantized checkpoint."""
    return paths.isfile(paths.join(path, CONFIG_FILE))


def write_quantized(out: str, config: Config, params: dict, info: dict[str, Any]) -> int:
    """Write the directory; returns the bytes of the saved param arrays."""
    paths.makedirs(out)
    flat = {"/".join(k): np.ascontiguousarray(np.asarray(v)) for k, v in traverse_util.flatten_dict(params).items()}
    paths.write_bytes(paths.join(out, PARAMS_FILE), st_save(flat))
    meta = {"config": config_to_dict(config), "quantization": info}
    paths.write_text(paths.join(out, CONFIG_FILE), json.dumps(meta, indent=1, default=str))
    return int(sum(a.nbytes for a in flat.values()))


def read_quantized_config(path: str) -> Config:
    """The config saved in a quantized directory (without reading the params)."""
    return config_from_dict(json.loads(paths.read_text(paths.join(path, CONFIG_FILE)))["config"])


def read_quantized(path: str) -> tuple[Config, dict, dict]:
    """(config, param tree of numpy arrays, quantization info) of a quantized directory."""
    meta = json.loads(paths.read_text(paths.join(path, CONFIG_FILE)))
    flat = st_load(paths.read_bytes(paths.join(path, PARAMS_FILE)))
    params = traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
    return config_from_dict(meta["config"]), params, meta["quantization"]
