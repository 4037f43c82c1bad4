"""Deterministic, resumable batches: the batch at step N depends only on (seed, N).

Each row is a random window of the token stream, drawn from a generator seeded by
(seed, split, step). Resuming needs no iterator state, and each host reads only the rows
of its slice of the global batch: the stream may be an array, a np.memmap or a RangeTokens
(a .bin on gs://), and only the windows a host indexes are read from disk or the network.
"""

from __future__ import annotations

import numpy as np

from tpustack.errors import UserError

_SPLIT_IDS = {"train": 0, "heldout": 1}


class Batcher:
    """Global batch [batch_size, seq_len + 1] windows; a host takes rows [start, stop)."""

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int, split: str = "train",
                 process_index: int = 0, process_count: int = 1):
        if len(tokens) <= seq_len + 1:
            raise UserError(f"config.train.seq_len: {seq_len} needs more than {len(tokens)} tokens in the "
                            f"{split} split; lower seq_len or add data")
        if batch_size % process_count:
            raise UserError(f"config.train.batch_size: {batch_size} is not divisible by the "
                            f"{process_count} hosts; make it a multiple of {process_count}")
        self.tokens = tokens
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.split_id = _SPLIT_IDS[split]
        per_host = batch_size // process_count
        self.rows = slice(process_index * per_host, (process_index + 1) * per_host)

    def offsets(self, step: int) -> np.ndarray:
        rng = np.random.default_rng((self.seed, self.split_id, step))
        return rng.integers(0, len(self.tokens) - self.seq_len - 1, size=self.batch_size)

    def host_batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's rows of the global batch at `step`: inputs and next-token targets."""
        window = np.arange(self.seq_len + 1)
        starts = self.offsets(step)[self.rows]
        rows_BT1 = np.asarray(self.tokens[starts[:, None] + window], dtype=np.int32)
        return {"inputs": rows_BT1[:, :-1], "targets": rows_BT1[:, 1:]}
