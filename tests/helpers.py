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


# A topology every libtpu release knows: probing it involves no tpustack code, so an error
# from it means libtpu itself cannot serve virtual TPU devices here.
LIBTPU_PROBE_TOPOLOGY = "v5e:2x2"


def libtpu_unusable() -> str | None:
    """Why libtpu's virtual TPU topologies are unavailable here, or None when they work.

    Only a missing libtpu (ImportError, or jax finding no TPU library) and jax's error when
    libtpu fails to load or initialise (a broken library, a busy lockfile) count; anything
    else propagates, so a bug fails its test instead of skipping it.
    """
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        return f"libtpu not installed (pip install -e '.[tpu]'): {e}"
    import jax
    from jax.experimental import topologies

    try:
        topologies.get_topology_desc(platform="tpu", topology_name=LIBTPU_PROBE_TOPOLOGY)
    except jax.errors.JaxRuntimeError as e:  # raised by loading / initialising the TPU plugin
        return f"libtpu cannot initialise a virtual {LIBTPU_PROBE_TOPOLOGY}: {e}"
    except RuntimeError as e:
        if "TPU support not installed" in str(e):  # jax's message when it finds no libtpu
            return f"libtpu not found by jax: {e}"
        raise
    return None


def require_libtpu() -> None:
    """Skip the calling test (or, at import, the module) when libtpu_unusable() says why."""
    import pytest

    why = libtpu_unusable()
    if why is not None:
        pytest.skip(why, allow_module_level=True)


def start_serve(checkpoint, *flags: str):
    """`tpustack serve --checkpoint CHECKPOINT FLAGS` on a free 127.0.0.1 port: (process, base url)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-m", "tpustack", "serve", "--checkpoint", str(checkpoint),
                             "--port", str(port), *flags], cwd=root, stderr=subprocess.PIPE, text=True)
    return proc, f"http://127.0.0.1:{port}"
