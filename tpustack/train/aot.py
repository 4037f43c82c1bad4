"""Compile the train step ahead of time for a device set or a TPU topology; nothing runs.

On CPU devices (XLA_FLAGS forcing 8) or libtpu's virtual topologies (`v5e:2x2`,
`v5p:2x2x2`: the real TPU compiler on a CPU machine). XLA's memory_analysis() and
cost_analysis() of the compiled step go beside tpustack.plan's estimate (plan/layouts.py):
the check on the estimate, and `tpustack compile-check`'s answer to "does this job compile
and fit" before renting the chips.
"""

from __future__ import annotations

import gzip
import re
from typing import Any

import jax
from jax.experimental import topologies

from tpustack.config import Config
from tpustack.mesh import make_mesh, mesh_shape
from tpustack.plan import steptime
from tpustack.plan.layouts import Row, layout_config, row, topology_estimate
from tpustack.train.pipeline import pipeline_bubble
from tpustack.train.step import make_trainer


def devices_for(backend: str, topology: str = "v5p:2x2x2") -> list:
    """8 CPU devices (XLA_FLAGS must force them) or a libtpu virtual topology's devices, one per chip.

    v4 (like v5p) joins its chip's two TensorCores into one megacore device on Cloud TPU VMs,
    but libtpu's virtual v4 defaults to one device per TensorCore (8 devices on v4:2x2x1,
    each with half a chip): chip_config_name="megacore" makes the topology a job gets."""
    if backend == "cpu":
        return jax.devices("cpu")
    kw = {"chip_config_name": "megacore"} if topology.split(":")[0] == "v4" else {}
    return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kw).devices)


def compile_train_step_full(config: Config, devices: list) -> Any:
    """The compiled train step of `config` on `devices` (real or virtual TPU): nothing runs."""
    trainer = make_trainer(config, make_mesh(config.mesh, devices))
    return trainer.lower_train_step(config.train.batch_size, config.train.seq_len).compile()


def compile_train_step(config: Config, devices: list) -> Any:
    """Lower and compile the train step of `config` on `devices`; return memory_analysis()."""
    return compile_train_step_full(config, devices).memory_analysis()


def check(config_path: str, backend: str, layout: str, remat: str, overrides: dict[str, str] | None = None,
          devices: list | None = None) -> Row:
    """One row: XLA's per-device argument / temp bytes beside the estimate's."""
    config = layout_config(config_path, layout, remat, overrides)
    stats = compile_train_step(config, devices if devices is not None else devices_for(backend))
    return row(config, backend, layout, remat, float(stats.argument_size_in_bytes), float(stats.temp_size_in_bytes))


def compile_check(config: Config, topology: str, hlo_path: str | None = None) -> dict[str, Any]:
    """Compile config's train step for a (virtual) TPU topology: XLA's per-chip bytes and FLOPs
    beside our estimate, so a user knows whether the job compiles and fits before renting.

    A step that needs more HBM than the chip has does not compile (RESOURCE_EXHAUSTED); that
    is an answer too: the report says it does not fit and how much XLA asked for.
    """
    devices = devices_for("tpu", topology)
    mesh = mesh_shape(config.mesh, len(devices))
    p = config.parallel
    report = {"config": config.name, "topology": topology, "chips": len(devices), "mesh": mesh,
              "pipeline_bubble": pipeline_bubble(mesh["stage"], p.microbatches, p.pipeline_repeats),
              **topology_estimate(config, topology, mesh)}
    try:
        compiled = compile_train_step_full(config, devices)
    except Exception as e:  # noqa: BLE001 - jax raises JaxRuntimeError; only OOM is an answer
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        need = re.search(r"HLO temporaries \(([\d.]+)G\)", str(e))
        return {**report, "fits": False, "compiled": False, "xla_error": str(e).splitlines()[0][:300],
                "xla_temp_bytes": float(need.group(1)) * 2**30 if need else float("nan")}
    hlo_text = compiled.as_text()
    if hlo_path:  # the compiled module, for reading what XLA did (gzip when the name ends .gz)
        with (gzip.open if hlo_path.endswith(".gz") else open)(hlo_path, "wt") as f:
            f.write(hlo_text)
    step = steptime.from_hlo(hlo_text, config, topology, len(devices))
    return {**report, **_xla_figures(compiled, report["hbm_bytes"]), "step_time": step.as_dict()}


def _xla_figures(compiled: Any, hbm: float) -> dict[str, Any]:
    """Per-chip bytes and FLOPs of a compiled step, and whether its bytes fit in `hbm`."""
    stats = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_total = float(stats.argument_size_in_bytes + stats.temp_size_in_bytes
                      + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    return {"compiled": True,
            "xla_argument_bytes": float(stats.argument_size_in_bytes),
            "xla_temp_bytes": float(stats.temp_size_in_bytes),
            "xla_output_bytes": float(stats.output_size_in_bytes), "xla_alias_bytes": float(stats.alias_size_in_bytes),
            "xla_total_bytes": xla_total, "fits": bool(hbm and xla_total <= hbm),
            "flops_per_step_per_chip": float(cost.get("flops", 0.0)) if cost else 0.0}
