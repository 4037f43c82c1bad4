"""The estimate's side of its check against XLA: named layouts, the estimate of a laid-out
config, and the rows and reports that put XLA's compiled figures beside it.

Compiling is training code: tpustack.train.aot compiles the train step (on CPU devices or
libtpu's virtual TPU topologies) and fills in XLA's side of the `Row`s and reports made here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tpustack.config import Config, load_config
from tpustack.plan.chips import CHIPS
from tpustack.plan.memory import TrainMemory, train_memory

# Named 8-device layouts: (mesh sizes, ZeRO stage over fsdp). `data` replicates the whole
# state whatever the stage; `fsdp` shards as much of it as parallel.zero_stage says.
_M = lambda data=1, stage=1, fsdp=1, tensor=1: {"data": data, "stage": stage, "fsdp": fsdp, "tensor": tensor}  # noqa: E731
LAYOUTS = {"data8": (_M(data=8), 0),
           "fsdp8-zero0": (_M(fsdp=8), 0),
           "fsdp8-zero1": (_M(fsdp=8), 1),
           "fsdp8-zero2": (_M(fsdp=8), 2),
           "fsdp8": (_M(fsdp=8), 3),
           "data2xfsdp4": (_M(data=2, fsdp=4), 3),
           "fsdp4xtensor2": (_M(fsdp=4, tensor=2), 3),
           "data4xtensor2": (_M(data=4, tensor=2), 0),
           "stage2xfsdp4": (_M(stage=2, fsdp=4), 3),
           "stage4xdata2": (_M(stage=4, data=2), 0),
           "data2xstage2xtensor2": (_M(data=2, stage=2, tensor=2), 0),
           "stage2xfsdp4-circular": (_M(stage=2, fsdp=4), 3)}
# Layouts that also set parallel.* beyond the ZeRO stage.
LAYOUT_OVERRIDES = {"stage2xfsdp4-circular": {"parallel.pipeline_repeats": "2"}}


@dataclasses.dataclass(frozen=True)
class Row:
    config: str
    backend: str
    layout: str
    remat: str
    stage: int
    xla_args: float
    xla_temp: float
    est_args: float  # weights + optimizer state + batch
    est_temp: float  # gradients + compute copy + activations

    def errors(self) -> tuple[float, float, float]:
        """Relative errors (estimate / XLA - 1) of arguments, temp and their sum."""
        rel = lambda e, x: e / x - 1 if x else float("nan")  # noqa: E731
        return (rel(self.est_args, self.xla_args), rel(self.est_temp, self.xla_temp),
                rel(self.est_args + self.est_temp, self.xla_args + self.xla_temp))


def layout_config(config_path: str, layout: str, remat: str, overrides: dict[str, str] | None = None) -> Config:
    """The config of `config_path` laid out as LAYOUTS[layout] (mesh, ZeRO stage, parallel.*)."""
    mesh, stage = LAYOUTS[layout]
    return load_config(config_path, {**(overrides or {}), "model.remat_policy": remat,
                                     "parallel.zero_stage": str(stage), **LAYOUT_OVERRIDES.get(layout, {}),
                                     **{f"mesh.{k}": str(v) for k, v in mesh.items()}})


def estimate_for(config: Config, mesh: dict[str, int], zero_stage: int, backend: str,
                 onchip: float = 0.0) -> TrainMemory:
    """tpustack.plan.memory's estimate of `config`'s train step on `mesh` (sizes per axis);
    onchip: the TPU chip's on-chip heap (chips.Chip.onchip_bytes)."""
    t, p = config.train, config.parallel
    return train_memory(config.model, t.precision, mesh, zero_stage, t.batch_size, t.seq_len,
                        config.model.remat_policy, backend=backend, microbatches=p.microbatches,
                        repeats=p.pipeline_repeats, onchip=onchip)


def row(config: Config, backend: str, layout: str, remat: str, xla_args: float, xla_temp: float) -> Row:
    """XLA's per-device argument / temp bytes of `config` laid out as `layout` beside the estimate's."""
    mesh, stage = LAYOUTS[layout]
    est = estimate_for(config, mesh, stage, backend)
    return Row(config.name, backend, layout, remat, stage, xla_args, xla_temp, est.state + est.batch,
               est.grads + est.compute_copy + est.activations)


def table(rows: list[Row]) -> str:
    """A markdown table of rows with relative errors."""
    out = ["| config | backend | layout (ZeRO) | remat | XLA args MB | est args MB | err | XLA temp MB "
           "| est temp MB | err | total err |", "|" + "---|" * 11]
    for r in rows:
        ea, et, tot = r.errors()
        out.append(f"| {r.config} | {r.backend} | {r.layout} ({r.stage}) | {r.remat} | {r.xla_args / 1e6:.1f} "
                   f"| {r.est_args / 1e6:.1f} | {ea:+.1%} | {r.xla_temp / 1e6:.1f} | {r.est_temp / 1e6:.1f} "
                   f"| {et:+.1%} | {tot:+.1%} |")
    return "\n".join(out)


def topology_estimate(config: Config, topology: str, mesh: dict[str, int]) -> dict[str, Any]:
    """The estimate's half of a compile-check report: per-chip bytes of config's train step on a
    TPU `topology` ("v5p:4x4x4") laid out as `mesh`, the ZeRO stage that layout gets, and the
    chip's HBM (0 for a generation the chips table lacks). The total and temp are what XLA's
    memory_analysis will report (TrainMemory.reported, the figure compile-check's fit verdict
    reads); `estimate_assigned_bytes` is the HBM the buffer assignment reserves."""
    stage = config.parallel.zero_stage if mesh["fsdp"] > 1 else 0
    generation = topology.split(":")[0]
    chip = CHIPS.get(generation) if generation in ("v4", "v5e", "v5p", "v6e") else None
    est = estimate_for(config, mesh, stage, "tpu", chip.onchip_bytes if chip else 0.0)
    return {"zero_stage": stage, "estimate_state_bytes": est.state + est.batch,
            "estimate_temp_bytes": est.reported - est.state - est.batch,
            "estimate_total_bytes": est.reported, "estimate_assigned_bytes": est.total,
            "hbm_bytes": CHIPS[generation].hbm_bytes if generation in ("v4", "v5e", "v5p", "v6e") else 0.0}
