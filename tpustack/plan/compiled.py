"""The estimate against XLA: compile the real train step ahead of time, read memory_analysis().

The one module of tpustack.plan that imports the training code: it is the check on the
estimate, not part of it (imports stay inside the functions). Works on CPU devices and on
libtpu's virtual topologies (`v5e:2x2`, `v5p:2x2x2`), where nothing runs, it only compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tpustack.plan.memory import train_memory

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


def devices_for(backend: str, topology: str = "v5p:2x2x2") -> list:
    """8 CPU devices (XLA_FLAGS must force them) or a libtpu virtual topology's devices."""
    import jax

    if backend == "cpu":
        return jax.devices("cpu")
    from jax.experimental import topologies

    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology).devices)


def compile_train_step(config, devices: list) -> Any:
    """Lower and compile the train step of `config` on `devices`; return memory_analysis()."""
    return compile_train_step_full(config, devices).memory_analysis()


def compile_train_step_full(config, devices: list) -> Any:
    """The compiled train step of `config` on `devices` (real or virtual TPU): nothing runs."""
    from tpustack.mesh import make_mesh
    from tpustack.train.step import make_trainer

    trainer = make_trainer(config, make_mesh(config.mesh, devices))
    return trainer.lower_train_step(config.train.batch_size, config.train.seq_len).compile()


def layout_config(config_path: str, layout: str, remat: str, overrides: dict[str, str] | None = None):
    """The config of `config_path` laid out as LAYOUTS[layout] (mesh, ZeRO stage, parallel.*)."""
    from tpustack.config import load_config

    mesh, stage = LAYOUTS[layout]
    return load_config(config_path, {**(overrides or {}), "model.remat_policy": remat,
                                     "parallel.zero_stage": str(stage), **LAYOUT_OVERRIDES.get(layout, {}),
                                     **{f"mesh.{k}": str(v) for k, v in mesh.items()}})


def estimate_for(config, mesh: dict[str, int], zero_stage: int, backend: str):
    """tpustack.plan.memory's estimate of `config`'s train step on `mesh` (sizes per axis)."""
    t, p = config.train, config.parallel
    return train_memory(config.model, t.precision, mesh, zero_stage, t.batch_size, t.seq_len,
                        config.model.remat_policy, backend=backend, microbatches=p.microbatches,
                        repeats=p.pipeline_repeats)


def check(config_path: str, backend: str, layout: str, remat: str, overrides: dict[str, str] | None = None,
          devices: list | None = None) -> Row:
    """One row: XLA's per-device argument / temp bytes beside the estimate's."""
    mesh, stage = LAYOUTS[layout]
    config = layout_config(config_path, layout, remat, overrides)
    stats = compile_train_step(config, devices if devices is not None else devices_for(backend))
    est = estimate_for(config, mesh, stage, backend)
    return Row(config.name, backend, layout, remat, stage, float(stats.argument_size_in_bytes),
               float(stats.temp_size_in_bytes), est.state + est.batch,
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


def compile_check(config, topology: str) -> dict[str, Any]:
    """Compile config's train step for a (virtual) TPU topology: XLA's per-chip bytes and FLOPs
    beside our estimate, so a user knows whether the job compiles and fits before renting.

    A step that needs more HBM than the chip has does not compile (RESOURCE_EXHAUSTED); that
    is an answer too: the report says it does not fit and how much XLA asked for.
    """
    import re

    from tpustack.mesh import mesh_shape
    from tpustack.model.transformer import pipeline_bubble
    from tpustack.plan.chips import chip

    devices = devices_for("tpu", topology)
    mesh = mesh_shape(config.mesh, len(devices))
    stage = config.parallel.zero_stage if mesh["fsdp"] > 1 else 0
    est = estimate_for(config, mesh, stage, "tpu")
    generation = topology.split(":")[0]
    hbm = chip(generation).hbm_bytes if generation in ("v4", "v5e", "v5p", "v6e") else 0.0
    report = {"config": config.name, "topology": topology, "chips": len(devices), "mesh": mesh, "zero_stage": stage,
              "pipeline_bubble": pipeline_bubble(mesh["stage"], config.parallel.microbatches,
                                                 config.parallel.pipeline_repeats),
              "estimate_state_bytes": est.state + est.batch,
              "estimate_temp_bytes": est.grads + est.compute_copy + est.activations,
              "estimate_total_bytes": est.total, "hbm_bytes": hbm}
    try:
        compiled = compile_train_step_full(config, devices)
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only OOM is an answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        return {**report, "fits": False, "compiled": False, "xla_error": str(e).splitlines()[0][:300],
                "xla_temp_bytes": float(need.group(1)) * 2**30 if need else float("nan")}
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_total = float(stats.argument_size_in_bytes + stats.temp_size_in_bytes
                      + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    return {**report, "compiled": True,
            "xla_argument_bytes": float(stats.argument_size_in_bytes), "xla_temp_bytes": float(stats.temp_size_in_bytes),
            "xla_output_bytes": float(stats.output_size_in_bytes), "xla_alias_bytes": float(stats.alias_size_in_bytes),
            "xla_total_bytes": xla_total, "fits": bool(hbm and xla_total <= hbm),
            "flops_per_step_per_chip": float(cost.get("flops", 0.0)) if cost else 0.0}
