"""Predicted training step time and MFU on a TPU topology: compute, memory, collectives.

One model, two sources of its inputs:

- `from_hlo`: a compiled step (libtpu's virtual topology): every executed op's FLOPs and
  HBM bytes (tpustack.plan.hlo_cost, loop trips counted) and every collective
  (tpustack.plan.hlo) with the computation it sits in and whether it is asynchronous.
- `analytic`: no compile (for `estimate --time` and `--suggest`): the roofline's train ops
  per chip (tpustack.plan.roofline.train_ops), the recompute remat adds, and the bytes per
  axis of tpustack.plan.comms.

The model: an op takes max(FLOPs / peak, bytes / HBM bandwidth) (the roofline); `compute`
sums the ops that are compute-bound, `memory` the memory-bound ones. A collective takes
its ring bytes over the ICI bandwidth its replica group can use: per link one way
interconnect / (2 x torus dims) (v4, v5p: 3-D; v5e, v6e: 2-D); a group spanning k torus
dims drives 2 links per dim (a bidirectional ring), 1 where the dim has no wraparound
(v5e / v6e dims under 16, v4 / v5p dims under 4). An asynchronous collective (XLA's
-start / -done pairs) can hide under the compute of the computation it sits in (a layer
loop's body); what does not fit under it, and every synchronous collective, is exposed.
Prediction = compute + memory + exposed: the breakdown sums to it by construction.
MFU = the model's FLOPs per chip (6 N + attention per token, tpustack.metrics) over
(prediction x peak): remat recompute and padding count against it, as in MaxText's MFU.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from tpustack.config import Config, ModelConfig
from tpustack.metrics import flops_per_token
from tpustack.plan import comms, roofline
from tpustack.plan.chips import CHIPS
from tpustack.remat import SAVED_PROJECTIONS

TORUS_DIMS = {"v4": 3, "v5p": 3, "v5e": 2, "v6e": 2}
WRAP_AT = {"v4": 4, "v5p": 4, "v5e": 16, "v6e": 16}  # a dim this long (or longer) is a ring


@dataclasses.dataclass(frozen=True)
class StepTime:
    compute_s: float  # compute-bound ops at peak FLOP/s
    memory_s: float  # memory-bound ops at HBM bandwidth
    collective_s: float  # every collective at its ICI bandwidth
    exposed_s: float  # the part of collective_s not hidden under compute
    model_flops: float  # per chip per step (6 N + attention per token)
    peak_flops: float

    @property
    def seconds(self) -> float:
        return self.compute_s + self.memory_s + self.exposed_s

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.seconds * self.peak_flops) if self.seconds else 0.0

    def as_dict(self) -> dict[str, float]:
        return {"step_s": self.seconds, "compute_s": self.compute_s, "memory_s": self.memory_s,
                "collective_s": self.collective_s, "exposed_collective_s": self.exposed_s,
                "model_flops_per_chip": self.model_flops, "mfu": self.mfu}


def topology_dims(topology: str) -> tuple[str, tuple[int, ...]]:
    """("v5p", (4, 4, 4)) from "v5p:4x4x4"."""
    gen, _, shape = topology.partition(":")
    return gen, tuple(int(x) for x in shape.split("x"))


def group_bandwidth(topology: str, group: int, dcn_bandwidth: float = 0.0) -> float:
    """Bytes/s one chip sends in a ring collective over `group` chips of `topology`."""
    gen, dims = topology_dims(topology)
    chip = CHIPS[gen]
    link = chip.interconnect_bandwidth / (2 * TORUS_DIMS[gen])
    links, covered = 0, 1
    for d in sorted((d for d in dims if d > 1), reverse=True):  # the group's devices span the longest dims first
        if covered >= group:
            break
        links += 2 if d >= WRAP_AT[gen] else 1
        covered *= d
    if covered < group and dcn_bandwidth:  # beyond the slice: data-center network
        return dcn_bandwidth
    return max(links, 1) * link


def collective_time(moved_bytes: float, topology: str, group: int) -> float:
    return moved_bytes / group_bandwidth(topology, group) if group > 1 else 0.0


def model_flops_per_chip(config: Config, chips: int) -> float:
    """Useful FLOPs per chip per step: (6 N + attention) per token x the step's tokens / chips."""
    t = config.train
    return flops_per_token(config.model, t.seq_len) * t.batch_size * t.seq_len / chips


def from_hlo(hlo_text: str, config: Config, topology: str, chips: int) -> StepTime:
    """The prediction from a compiled step's HLO (see the module docstring)."""
    from tpustack.plan.hlo import collectives
    from tpustack.plan.hlo_cost import hlo_ops

    chip = CHIPS[topology_dims(topology)[0]]
    p, bw = chip.peak_flops, chip.hbm_bandwidth
    compute = memory = 0.0
    busy: dict[str, float] = {}  # per computation, one run: the op time collectives may hide under
    ops = hlo_ops(hlo_text)
    kernels = sum(op.runs for op in ops if op.opcode == "custom-call")
    per_kernel = kernel_flops(config, chips) / kernels if kernels else 0.0
    if not kernels and any(op.opcode == "interpreted-kernel" for op in ops):
        compute += kernel_flops(config, chips) / p  # interpret-mode kernels: their Mosaic work by formula
    for op in ops:
        flops = per_kernel if op.opcode == "custom-call" else op.flops
        tc, tm = flops / p, op.bytes / bw
        compute += op.runs * tc if tc >= tm else 0.0
        memory += op.runs * tm if tm > tc else 0.0
        busy[op.computation] = busy.get(op.computation, 0.0) + max(tc, tm)
    total = exposed = 0.0
    hidden: dict[str, tuple[float, int]] = {}
    for c in collectives(hlo_text):
        t = collective_time(c.moved_bytes, topology, c.group)
        total += c.runs * t
        if c.asynchronous:
            prev = hidden.get(c.computation, (0.0, c.runs))
            hidden[c.computation] = (prev[0] + t, c.runs)
        else:
            exposed += c.runs * t
    for comp, (t, runs) in hidden.items():
        exposed += runs * max(0.0, t - busy.get(comp, 0.0))
    return StepTime(compute, memory, total, exposed, model_flops_per_chip(config, chips), p)


def flash_attention_flops(config: Config, local_batch: float, heads: float) -> float:
    """FLOPs of the Pallas flash kernels per step per chip: causal blocks skipped (half of the
    4 B N T^2 H forward, 8 backward, + 2 recomputing the scores), and the forward again
    under any remat policy."""
    m, t = config.model, config.train.seq_len
    unit = local_batch * heads * t * t * m.heads_dim * m.num_layers / 2
    # the kernel's output is no matmul output and carries no checkpoint name, so every remat
    # policy (dots ones included) reruns its forward in the backward
    return unit * (4 + 8 + 2 + (4 if m.remat_policy != "none" else 0))


def kernel_flops(config: Config, chips: int) -> float:
    """FLOPs per chip of the step's Pallas kernels (0 without them): what the HLO cannot show."""
    m, t, mesh = config.model, config.train, config.mesh
    if m.attention_impl not in ("pallas", "auto"):
        return 0.0
    tensor = max(1, mesh.tensor)
    return flash_attention_flops(config, t.batch_size * tensor / chips, -(-m.num_heads // tensor))


def remat_recompute(remat: str, cfg: ModelConfig) -> float:
    """Extra forward passes of the layers under a remat policy (as a fraction of one forward)."""
    if remat == "none":
        return 0.0
    if "dots" in remat and remat not in SAVED_PROJECTIONS:  # matmul outputs saved: only the
        return 0.15  # elementwise work and attention rerun
    if remat in SAVED_PROJECTIONS:  # the projections it does not save rerun
        flops = _projection_flops(cfg)
        return 0.15 + sum(v for p, v in flops.items() if p not in SAVED_PROJECTIONS[remat]) / sum(flops.values())
    return 1.0


def _projection_flops(cfg: ModelConfig) -> dict[str, float]:
    """Per token, FLOPs of each dense projection of a layer (the share a named policy reruns)."""
    d, f, q, kv = cfg.d_model, cfg.ffn_dim, cfg.num_heads * cfg.heads_dim, cfg.num_kv_heads * cfg.heads_dim
    return {"q": 2 * d * q, "k": 2 * d * kv, "v": 2 * d * kv, "o": 2 * q * d, "gate": 2 * d * f, "up": 2 * d * f,
            "down": 2 * f * d}


def analytic(config: Config, chip_name: str, mesh: dict[str, int], topology: str | None = None) -> StepTime:
    """The prediction without a compile: roofline train ops per chip, remat recompute, and
    comms' bytes per axis (data / fsdp collectives asynchronous, hidden under the layers'
    compute; tensor and pipeline transfers on the critical path), plus the pipeline bubble."""
    m, t, par = config.model, config.train, config.parallel
    chip = CHIPS[chip_name]
    chips = math.prod(mesh.values())
    topology = topology or default_topology(chip_name, chips)
    dp, tensor, stages = mesh.get("data", 1) * mesh.get("fsdp", 1), mesh.get("tensor", 1), mesh.get("stage", 1)
    local = max(1, t.batch_size // dp)
    dtype = "float32" if t.precision == "f32" else "bfloat16"
    ops = roofline.train_ops(m, local, t.seq_len, dtype)
    flash = m.attention_impl in ("pallas", "auto")
    if flash:  # flash: no [T, S] scores in HBM, causal blocks skipped
        c = 4 if dtype == "float32" else 2
        ops = [roofline.Op(o.name, o.kind, flash_attention_flops(config, local, m.num_heads) / m.num_layers,
                           3 * local * t.seq_len * (2 * m.num_heads + 2 * m.num_kv_heads) * m.heads_dim * c, o.count)
               if o.kind == "attention" else o for o in ops]
    extra = remat_recompute(m.remat_policy, m) / 3  # train_ops count forward + backward (3 forwards)
    compute = memory = 0.0
    for op in ops:
        # remat reruns the layers' forward (the flash op counts its own rerun)
        rerun = op.name not in ("lm head", "cross-entropy") and not (flash and op.kind == "attention")
        scale = (1 + (extra if rerun else 0.0)) / (tensor * stages)
        tc, tm = op.flops * scale / chip.peak_flops, op.bytes * scale / chip.hbm_bandwidth
        compute += op.count * tc if tc >= tm else 0.0
        memory += op.count * tm if tm > tc else 0.0
    if stages > 1:  # GPipe: (M + S - 1) / M ticks of work for M microbatches' worth
        bubble = (par.microbatches * par.pipeline_repeats + stages - 1) / (par.microbatches * par.pipeline_repeats)
        compute, memory = compute * bubble, memory * bubble
    moved = comms.step_collective_bytes(m, mesh, par.zero_stage if mesh.get("fsdp", 1) > 1 else 0, t.batch_size,
                                        t.seq_len, par.microbatches, dtype, par.pipeline_repeats)
    t_data = collective_time(moved["data"], topology, dp)
    t_tensor = collective_time(moved["tensor"], topology, tensor)
    t_stage = collective_time(moved["stage"], topology, 2)
    exposed = max(0.0, t_data - compute) + t_tensor + t_stage
    return StepTime(compute, memory, t_data + t_tensor + t_stage, exposed, model_flops_per_chip(config, chips),
                    chip.peak_flops)


def default_topology(chip_name: str, chips: int) -> str:
    """The smallest near-cubic (v4, v5p) or near-square (v5e, v6e) slice of `chips` chips."""
    n = TORUS_DIMS.get(chip_name, 2)
    dims = [1] * n
    left = chips
    i = 0
    while left > 1:
        dims[i % n] *= 2
        left //= 2
        i += 1
    return f"{chip_name}:" + "x".join(str(d) for d in sorted(dims))


def render(st: dict[str, Any]) -> str:
    """One line of the breakdown."""
    ms = lambda s: f"{s * 1e3:.1f} ms" if s >= 1e-3 else f"{s * 1e3:.3g} ms"  # noqa: E731
    return (f"predicted step {ms(st['step_s'])} = compute {ms(st['compute_s'])} + memory {ms(st['memory_s'])} "
            f"+ exposed collectives {ms(st['exposed_collective_s'])} (of {ms(st['collective_s'])} in all); "
            f"MFU {st['mfu']:.1%}")
