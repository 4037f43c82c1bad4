"""Training metrics: FLOPs per token and MFU, TensorBoard scalars, a progress bar with ETA.

TensorBoard logs go to a local directory or a URL (gs://...). tensorboardX's own gs:// writer
(google-cloud-storage) uploads again from `__del__` after `close()`, which hangs for two
minutes at interpreter exit once the bucket is unreachable; event files on remote paths are
written through tpustack.paths instead (`_RemoteEventFile`).
"""

from __future__ import annotations

import io
import math
import sys
import threading
from typing import Any

import jax
from tqdm import tqdm

from tpustack import paths
from tpustack.config import ModelConfig
from tpustack.plan.chips import chip_for_device


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the matmul weights + 12 L T (N_heads H) for attention.

    N excludes the embedding lookup (a gather, not a matmul) but counts the LM head; the
    attention term is PaLM's (appendix B) with causal masking not discounted.
    """
    n = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
    attention = 12 * cfg.num_layers * seq_len * cfg.num_heads * cfg.heads_dim
    return 6 * n + attention


def peak_flops_total(devices: list | None = None) -> float:
    """Sum of the devices' peak FLOP/s (CPU devices share one measured host peak)."""
    devices = devices or jax.devices()
    if devices[0].platform == "cpu":
        return chip_for_device(devices[0]).peak_flops  # fake CPU devices share the same cores
    return sum(chip_for_device(d).peak_flops for d in devices)


def mfu(tokens_per_second: float, flops_token: float, peak: float) -> float:
    return tokens_per_second * flops_token / peak if peak > 0 else float("nan")


class _RemoteEventFile:
    """A TensorBoard event file on an object store: every flush rewrites the whole object.

    Objects cannot be appended to; rewriting on each flush (every `flush_secs`) lets
    TensorBoard follow a run while it trains. Scalars are ~50 bytes an event, so a file stays
    small enough to rewrite.
    """

    def __init__(self, path: str):
        self._path = path
        self._buffer = io.BytesIO()
        self._flushed = -1
        self._lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self._lock:
            self._buffer.write(data)

    def flush(self) -> None:
        with self._lock:
            if self._buffer.tell() != self._flushed:
                paths.write_bytes(self._path, self._buffer.getvalue())
                self._flushed = self._buffer.tell()

    def close(self) -> None:
        self.flush()


class _RemoteEventFiles:
    """tensorboardX's writer-factory interface (open, directory_check) for remote logdirs."""

    def open(self, path: str) -> _RemoteEventFile:
        return _RemoteEventFile(path)

    def directory_check(self, path: str) -> None:
        paths.makedirs(path)


def _register_remote_event_files(logdir: str) -> None:
    from tensorboardX import record_writer

    scheme = logdir.split("://", 1)[0]
    record_writer.register_writer_factory(scheme, _RemoteEventFiles())


class MetricsWriter:
    """TensorBoard scalars from process 0 only; other processes write nothing."""

    def __init__(self, logdir: str | None):
        self._writer = None
        if logdir and jax.process_index() == 0:
            from tensorboardX import SummaryWriter

            if paths.is_remote(logdir):
                _register_remote_event_files(logdir)
            paths.makedirs(logdir)
            self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10)

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in values.items():
            value = float(value)
            if math.isfinite(value):
                self._writer.add_scalar(f"{prefix}{name}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class Progress:
    """A tqdm bar on stderr with ETA and the latest loss (process 0, interactive or not)."""

    def __init__(self, total: int, initial: int, desc: str):
        self._bar = None
        if jax.process_index() == 0:
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=sys.stdout)
        elif jax.process_index() == 0:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
