"""`tpustack estimate --suggest`: rank the layouts of a config on N chips by predicted step time.

The search: data x stage x fsdp x tensor sizes whose product is N (tensor dividing the query
and kv heads, stage dividing the layers), every ZeRO stage where fsdp > 1, remat none /
dots_with_no_batch_dims_saveable / save_dots_except_mlp_in / nothing_saveable, pipeline
microbatches S, 2 S, 4 S, and 1..16 sequences per data-parallel shard. A layout is feasible
when tpustack.plan.memory's estimate fits 90% of the chip's HBM (a margin for the estimate's
error, docs/capacity.md). Layouts with different batches are ranked by predicted time per
token (the step time over the step's tokens), i.e. by predicted MFU; each comes with the
compile-check command that verifies it on the real TPU compiler.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Iterator

from tpustack.config import Config
from tpustack.plan import steptime
from tpustack.plan.chips import CHIPS
from tpustack.plan.memory import train_memory

REMATS = ("none", "dots_with_no_batch_dims_saveable", "save_dots_except_mlp_in", "nothing_saveable")
HBM_MARGIN = 0.9


def _pow2_divisors(n: int, cap: int) -> list[int]:
    return [d for d in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if d <= min(n, cap) and n % d == 0]


def layouts(config: Config, chips: int) -> Iterator[list[Config]]:
    """Every candidate layout of `config` on `chips` chips, as configs grouped by all but the
    batch (ascending batch within a group: memory grows with it)."""
    m = config.model
    for tensor in _pow2_divisors(math.gcd(m.num_heads, m.num_kv_heads), 8):
        for stage in _pow2_divisors(m.num_layers, 4):
            if chips % (tensor * stage):
                continue
            rest = chips // (tensor * stage)
            for data in _pow2_divisors(rest, rest):
                fsdp = rest // data
                zeros = (0, 1, 2, 3) if fsdp > 1 else (0,)
                micros = (stage, 2 * stage, 4 * stage) if stage > 1 else (1,)
                for zero, remat, micro in itertools.product(zeros, REMATS, micros):
                    if stage > 1 and not m.scan_layers:
                        continue
                    yield [dataclasses.replace(
                        config, model=dataclasses.replace(m, remat_policy=remat),
                        mesh=dataclasses.replace(config.mesh, data=data, stage=stage, fsdp=fsdp, tensor=tensor),
                        train=dataclasses.replace(config.train,
                                                  batch_size=per_shard * data * fsdp * (micro if stage > 1 else 1)),
                        parallel=dataclasses.replace(config.parallel, zero_stage=zero, microbatches=micro))
                        for per_shard in (1, 2, 4, 8, 16)]


def mesh_of(config: Config) -> dict[str, int]:
    c = config.mesh
    return {"data": c.data, "stage": c.stage, "fsdp": c.fsdp, "tensor": c.tensor}


def evaluate(config: Config, chip_name: str, topology: str) -> dict[str, Any]:
    """Predicted memory and step time of one laid-out config."""
    mesh, t, p = mesh_of(config), config.train, config.parallel
    zero = p.zero_stage if mesh["fsdp"] > 1 else 0
    mem = train_memory(config.model, t.precision, mesh, zero, t.batch_size, t.seq_len, config.model.remat_policy,
                       backend="tpu", microbatches=p.microbatches, repeats=p.pipeline_repeats)
    st = steptime.analytic(config, chip_name, mesh, topology)
    return {"mesh": mesh, "zero_stage": zero, "remat": config.model.remat_policy, "microbatches": p.microbatches,
            "batch": t.batch_size, "memory_bytes": mem.total, "step": st.as_dict(),
            "seconds_per_token": st.seconds / (t.batch_size * t.seq_len)}


def suggest(config: Config, config_path: str, chip_name: str, chips: int, top: int = 3,
            topology: str | None = None) -> list[dict[str, Any]]:
    """The `top` feasible layouts by predicted time per token, each with its compile-check command."""
    topology = topology or steptime.default_topology(chip_name, chips)
    hbm = CHIPS[chip_name].hbm_bytes
    rows = []
    for group in layouts(config, chips):
        for c in group:
            r = evaluate(c, chip_name, topology)
            if r["memory_bytes"] > HBM_MARGIN * hbm:
                break  # a larger batch needs more still
            rows.append(r)
    rows.sort(key=lambda r: (r["seconds_per_token"], r["memory_bytes"]))
    for r in rows[:top]:
        r["command"] = command(config_path, topology, r)
    return rows[:top]


def command(config_path: str, topology: str, r: dict[str, Any]) -> str:
    """The compile-check command line that verifies a suggestion."""
    flags = [f"--config.mesh.{k}={v}" for k, v in r["mesh"].items()]
    flags += [f"--config.parallel.zero_stage={r['zero_stage']}", f"--config.model.remat_policy={r['remat']}",
              f"--config.train.batch_size={r['batch']}"]
    if r["mesh"]["stage"] > 1:
        flags.append(f"--config.parallel.microbatches={r['microbatches']}")
    return f"tpustack compile-check --config {config_path} --topology {topology} " + " ".join(flags)


def render(rows: list[dict[str, Any]], hbm: float) -> str:
    """The suggestions as text."""
    if not rows:
        return "no layout fits: more chips, or a chip with more HBM"
    out = []
    for i, r in enumerate(rows, 1):
        layout = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 chip"
        out.append(f"{i}. {layout}, ZeRO-{r['zero_stage']}, remat {r['remat']}, batch {r['batch']}"
                   + (f", {r['microbatches']} microbatches" if r["mesh"]["stage"] > 1 else "")
                   + f": {r['memory_bytes'] / 1e9:.1f} of {hbm / 1e9:.0f} GB/chip, {steptime.render(r['step'])}")
        out.append(f"   {r['command']}")
    return "\n".join(out)
