"""Small configs and batches shared by the tests."""

from __future__ import annotations

import numpy as np

from tpustack.config import load_config

TINY_OVERRIDES = {
    "model.vocab_size": "384", "model.d_model": "64", "model.num_layers": "2", "model.num_heads": "4",
    "model.num_kv_heads": "2", "model.ffn_dim": "128", "model.max_seq_len": "64",
    "train.batch_size": "8", "train.seq_len": "16", "train.steps": "20", "train.warmup_steps": "5",
    "train.eval_every": "0", "train.eval_batches": "2", "train.log_every": "5", "train.time_limit_s": "0",
    "data.max_bytes": "400000", "checkpoint.every": "10",
}


def tiny_config(**overrides):
    """configs/tiny.py shrunk to test size; keyword overrides use __ for dots (mesh__fsdp=8)."""
    merged = dict(TINY_OVERRIDES)
    merged.update({k.replace("__", "."): str(v) for k, v in overrides.items()})
    return load_config("configs/tiny.py", merged)


def random_batch(batch: int, length: int, vocab: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, length + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
