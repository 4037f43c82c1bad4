"""The estimate against XLA: compile the real train step ahead of time, read memory_analysis().

The one module of tpustack.plan that imports the training code: it is the check on the
estimate, not part of it (imports stay inside the functions). Works on CPU devices and on
libtpu's virtual topologies (`v5e:2x2`, `v5p:2x2x2`), where nothing runs, it only compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tpustack.plan.memory import train_memory

# Mesh layout -> the ZeRO stage our train step realises with it: `data` replicates the
# whole state (ZeRO-0), `fsdp` shards all of it (ZeRO-3). ZeRO-1/2 need issue 3.
LAYOUTS = {"data8": ({"data": 8, "fsdp": 1, "tensor": 1}, 0),
           "fsdp8": ({"data": 1, "fsdp": 8, "tensor": 1}, 3),
           "fsdp4xtensor2": ({"data": 1, "fsdp": 4, "tensor": 2}, 3)}


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


def check(config_path: str, backend: str, layout: str, remat: str, overrides: dict[str, str] | None = None,
          devices: list | None = None) -> Row:
    """One row: XLA's per-device argument / temp bytes beside the estimate's."""
    from tpustack.config import load_config

    mesh, stage = LAYOUTS[layout]
    ov = {**(overrides or {}), "model.remat_policy": remat, **{f"mesh.{k}": str(v) for k, v in mesh.items()}}
    config = load_config(config_path, ov)
    stats = compile_train_step(config, devices if devices is not None else devices_for(backend))
    est = train_memory(config.model, config.train.precision, mesh, stage, config.train.batch_size,
                       config.train.seq_len, remat, backend=backend)
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
    beside our estimate, so a user knows whether the job compiles and fits before renting."""
    from tpustack.mesh import mesh_shape
    from tpustack.plan.chips import chip

    devices = devices_for("tpu", topology)
    compiled = compile_train_step_full(config, devices)
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mesh = mesh_shape(config.mesh, len(devices))
    stage = 3 if mesh["fsdp"] > 1 else 0
    est = train_memory(config.model, config.train.precision, mesh, stage, config.train.batch_size,
                       config.train.seq_len, config.model.remat_policy, backend="tpu")
    xla_total = float(stats.argument_size_in_bytes + stats.temp_size_in_bytes
                      + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    generation = topology.split(":")[0]
    hbm = chip(generation).hbm_bytes if generation in ("v4", "v5e", "v5p", "v6e") else 0.0
    return {"config": config.name, "topology": topology, "chips": len(devices), "mesh": mesh, "zero_stage": stage,
            "xla_argument_bytes": float(stats.argument_size_in_bytes), "xla_temp_bytes": float(stats.temp_size_in_bytes),
            "xla_output_bytes": float(stats.output_size_in_bytes), "xla_alias_bytes": float(stats.alias_size_in_bytes),
            "xla_total_bytes": xla_total, "estimate_state_bytes": est.state + est.batch,
            "estimate_temp_bytes": est.grads + est.compute_copy + est.activations,
            "estimate_total_bytes": est.total, "hbm_bytes": hbm, "fits": bool(hbm and xla_total <= hbm),
            "flops_per_step_per_chip": float(cost.get("flops", 0.0)) if cost else 0.0}
