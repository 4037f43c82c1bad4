"""Load a model for inference from a tpustack workdir or a Hugging Face Llama directory."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from tpustack.config import ModelConfig
from tpustack.data import load_tokenizer
from tpustack.errors import UserError


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    params: Any
    tokenizer: Any  # None when the checkpoint names none (ids only)


def load_model(path: str) -> LoadedModel:
    """A workdir (WORKDIR/checkpoints) or an HF directory (config.json + *.safetensors)."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        from tpustack.train.loop import load_trained

        config, _, state = load_trained(path, {"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
        return LoadedModel(config.model, state.params, load_tokenizer(config.data.tokenizer))
    if os.path.isfile(os.path.join(path, "config.json")):
        from tpustack.interop.hf import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(path)
        tokenizer = load_tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None
        return LoadedModel(cfg, jax.tree.map(jax.numpy.asarray, params), tokenizer)
    raise UserError(f"--checkpoint {path!r}: neither a tpustack workdir (with checkpoints/) nor a "
                    f"Hugging Face directory (with config.json)")
