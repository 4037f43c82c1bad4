"""The memory estimate against XLA's compiled train step (memory_analysis per device).

Cheap rows of the tables in docs/capacity.md: tiny with scanned layers, batch 16 x 64, on 8
CPU devices, and on libtpu's virtual v5p:2x2x2 (the real TPU compiler, nothing runs).
Each row compiles in a few seconds. Args (weights + optimizer state + batch) are exact
on CPU and, with the (8, 128) tile padding counted, on TPU; total (args + temp) holds
within 10% on CPU. (The llama_1b rows, within 10% on both backends, take minutes.)
"""

from __future__ import annotations

import jax
import pytest

from helpers import require_libtpu
from tpustack.train.aot import check, devices_for

SCANNED = {"model.scan_layers": "True", "train.batch_size": "16", "train.seq_len": "64"}

needs_8 = pytest.mark.skipif(len(jax.devices("cpu")) < 8, reason="needs 8 CPU devices (XLA_FLAGS)")


@needs_8
@pytest.mark.parametrize("layout,remat", [("data8", "none"), ("fsdp8-zero2", "nothing_saveable"),
                                          ("fsdp8", "none"), ("fsdp4xtensor2", "nothing_saveable")])
def test_cpu_scanned_rows(layout, remat):
    row = check("configs/tiny.py", "cpu", layout, remat, SCANNED)
    args, _, total = row.errors()
    assert abs(args) < 1e-3, row
    assert abs(total) < 0.10, row


def test_tpu_row_with_tile_padding():
    require_libtpu()  # skips only a missing or unusable libtpu; any other error fails
    devices = devices_for("tpu", "v5p:2x2x2")
    row = check("configs/tiny.py", "tpu", "fsdp8", "nothing_saveable", SCANNED, devices=devices)
    args, _, total = row.errors()
    # tiny's narrow dims pad on TPU (e.g. head_dim 32 -> 128, d_model 192 -> 256): without
    # the padding the estimate was 40% under XLA's arguments here.
    assert abs(args) < 0.005, row
    # Temp does not hold for tiny on TPU (docs/capacity.md): XLA keeps megabytes of such
    # a small step in on-chip VMEM, and memory_analysis() counts it in neither a shape
    # formula's way nor as HBM. A guard against regressions only:
    assert abs(total) < 0.35, row
