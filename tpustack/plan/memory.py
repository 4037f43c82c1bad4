"""Memory estimates: weights at each precision, KV cache, ZeRO training state, activations.

Two accountings side by side. The chapter's (30.2, 30.7): 16 bytes/param of training
state (2 fp16 weight + 2 fp16 grad + 12 fp32 master/momentum/variance), sharded per ZeRO
stage. Ours, as tpustack/train lays it out: an fp32 master copy (model.param_dtype),
gradients in the master dtype (params are cast to the compute dtype where they are used,
so their cotangents land in fp32), optax adamw's mu and nu in fp32, and, under bf16/fp16
precision, a compute-dtype copy of the weights made inside the step. Per-device bytes
come from the real parameter shapes and the mesh's logical-axis rules, so a dimension
that does not divide (or a replicated norm scale) is counted as XLA will lay it out.

Dimension letters as in tpustack/model: B batch, T length, D model, F mlp, N heads,
K kv heads, H head dim, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses
import math

from tpustack.config import COMPUTE_DTYPE, ModelConfig
from tpustack.dtypes import itemsize
from tpustack.plan.activations import activations as activation_peak
from tpustack.plan.buffers import (MESH_AXES, Param, buffer_bytes, default_rules, end_params, layer_params,
                                   param_table, shard_shape, stacked_params, tree_bytes)

GB = 1e9

# Bytes per parameter of stored weights. int8 adds one f32 scale per output channel
# (counted exactly in weight_bytes_for); nf4 (QLoRA) stores 4-bit codes plus one fp32
# absmax per 64-weight block: 4 + 32/64 = 4.5 bits.
WEIGHT_FORMATS = {**{f: float(itemsize(f)) for f in ("fp32", "bf16", "fp16", "int8", "int4")}, "nf4": 4.5 / 8}
NF4_BLOCK = 64


# ---------------------------------------------------------------------------- chapter formulas
def weight_bytes(num_params: float, fmt: str) -> float:
    """The chapter's rule of thumb: params x bytes/param (fp16 2, int8 1, 4-bit 0.5)."""
    nominal = {"nf4": 0.5}.get(fmt, WEIGHT_FORMATS[fmt])  # the chapter quotes nf4 as 0.5 B/param
    return num_params * nominal


def kv_bytes_chapter(context: int, num_layers: int, d_model: int, batch: int = 1,
                     bytes_per_elem: float = 2) -> float:
    """KV bytes = 2 x L x n_layers x d_model x batch x bytes (30.4d; multi-head attention)."""
    return 2 * context * num_layers * d_model * batch * bytes_per_elem


def zero_chapter(num_params: float, n: int, stage: int) -> float:
    """Per-GPU bytes of training state for ZeRO 0..3 with the 2+2+12 accounting (30.2)."""
    p = num_params
    return {0: 16 * p, 1: 4 * p + 12 * p / n, 2: 2 * p + 14 * p / n, 3: 16 * p / n}[stage]


def fits(params_b: float, bytes_per_param: float, n_gpu: int, gpu_gb: float = 80,
         overhead_gb: float = 4) -> tuple[float, bool]:
    """The chapter's quick estimator (30.7), verbatim: (GB per GPU, fits?)."""
    total = params_b * bytes_per_param
    per_gpu = total / n_gpu + overhead_gb
    return round(per_gpu, 1), per_gpu <= gpu_gb


# ---------------------------------------------------------------------------- inference
def weight_bytes_for(cfg: ModelConfig, fmt: str) -> float:
    """Stored weight bytes of a config in fp32 / bf16 / int8 (+ per-channel scales) / int4 / nf4."""
    params = cfg.num_params()
    if fmt == "int8":  # one f32 scale per output channel of every matmul weight (rows of the embedding)
        scales = sum(math.prod(p.shape) // _contracted(p) for p in param_table(cfg) if "norm" not in p.name)
        return params + 4 * scales
    if fmt == "nf4":
        return params * 0.5 + math.ceil(params / NF4_BLOCK) * 4
    return params * WEIGHT_FORMATS[fmt]


def _contracted(p: Param) -> int:
    """The size of the dimensions a weight contracts with the activation."""
    dims = dict(zip(p.axes, p.shape))
    if p.name.endswith("attn/o"):
        return dims["heads"] * dims["head_dim"]
    if p.name == "embedding":
        return dims["embed"]
    return p.shape[p.axes.index("layers") + 1] if "layers" in p.axes else p.shape[0]


def kv_cache_bytes(cfg: ModelConfig, context: int, batch: int = 1, kv_dtype: str = "bf16") -> float:
    """KV cache bytes (GQA-aware: K kv heads, not N); int8 adds one f32 scale per token per kv
    head, as tpustack.infer.cache stores it. The decode cache and the serving pool both count by this."""
    elems = 2 * context * cfg.num_layers * cfg.num_kv_heads * cfg.heads_dim * batch
    if kv_dtype == "int8":
        return elems + 2 * context * cfg.num_layers * cfg.num_kv_heads * batch * 4
    return elems * itemsize(kv_dtype)


# ---------------------------------------------------------------------------- training
@dataclasses.dataclass(frozen=True)
class TrainMemory:
    """Per-device bytes of one training step under one ZeRO stage and mesh."""

    stage: int
    master: float  # fp32 (param_dtype) weights the optimizer updates
    grads: float  # gradients, in the master dtype
    adam: float  # mu + nu
    compute_copy: float  # compute-dtype weights made inside the step (0 under f32)
    activations: float  # saved for the backward pass + the live workspace
    batch: float  # the int32 inputs and targets
    counted_twice: float = 0.0  # what memory_analysis's temp counts a second time (see `reported`)

    @property
    def state(self) -> float:
        """The persistent train state: what XLA counts as the step's arguments (minus the batch)."""
        return self.master + self.adam

    @property
    def total(self) -> float:
        """The bytes XLA allocates: arguments + the temp heap at its peak."""
        return self.master + self.grads + self.adam + self.compute_copy + self.activations + self.batch

    @property
    def reported(self) -> float:
        """What XLA TPU's memory_analysis reports (arguments + temp): the allocation plus the
        heap's excess over the bytes its live ranges list, which its temp counts once more
        (2 x heap - L; docs/capacity.md)."""
        return self.total + self.counted_twice


def train_memory(cfg: ModelConfig, precision: str, mesh: dict[str, int], stage: int,
                 batch: int, seq_len: int, remat: str | None = None, backend: str = "tpu",
                 microbatches: int = 4, repeats: int = 1, onchip: float = 0.0) -> TrainMemory:
    """Our layout's per-device training bytes for ZeRO `stage` (0..3) sharding over mesh['fsdp'].

    backend "tpu": the cast to the compute dtype fuses into each matmul, except that the
    layer scan's stacked weights are cast once, hoisted out of the loop (below ZeRO-3), and
    ZeRO-3 gathers cast layers; every array is counted with its (8, 128) tile padding.
    "cpu": XLA CPU materialises the cast copy and keeps bf16 activations in f32.
    microbatches: GPipe microbatches (parallel.microbatches), used when mesh['stage'] > 1;
    repeats: layer chunks per stage of a circular pipeline (parallel.pipeline_repeats);
    onchip: the TPU chip's on-chip heap (chips.Chip.onchip_bytes), for buffers XLA keeps there.

    `activations` is everything at the step's peak beyond the gradients and the compute
    copy: the backward pass's residuals and workspace, or the optimizer update's workspace
    tree where that is larger (see below).
    """
    table = param_table(cfg)
    remat = remat or cfg.remat_policy
    compute = COMPUTE_DTYPE[precision]
    b = _Bytes(mesh, stage, itemsize(cfg.param_dtype), itemsize(compute), backend)
    local_batch = -(-batch // (mesh.get("data", 1) * mesh.get("fsdp", 1)))
    windowed = collective_matmul(mesh, stage, local_batch * seq_len, backend)
    master = b.tree(table, b.master, zero_sharded=stage >= 3)
    grads = b.tree(table, b.master, zero_sharded=stage >= 2)
    adam = 2 * b.tree(table, 4, zero_sharded=stage >= 1)
    copy = _compute_copy_bytes(cfg, table, b, windowed and stage >= 3)
    stages = mesh.get("stage", 1)
    if backend == "tpu" and stages > 1:
        copy = _pipeline_copy_bytes(cfg, table, b)
    layer = layer_params(cfg)
    # One layer's weights as its matmuls read them: whole over fsdp (ZeRO-3 all-gathers
    # them, ZeRO-0..2 slice them out of the stacked [L, ...] weights), split over tensor.
    layer_weights = b.tree(layer, b.compute, zero_sharded=False)
    # (a pipeline on TPU reads its stage's weights from the loop-invariant cast views of
    # _pipeline_copy_bytes, and those serve as the weight residuals: #26 stacks none)
    # One scanned layer on TPU: XLA's while-loop simplifier removes the trip-count-1 scan
    # (no while loop in the HLO of sample #62 or of a fresh d_model 4096 compile), so the
    # layer reads the hoisted cast copy itself (no slice of it) and stacks nothing per step.
    one_layer = backend == "tpu" and cfg.scan_layers and cfg.num_layers == 1 and stages == 1
    saved_weights = (_saved_weight_bytes(cfg, layer, remat, b) if cfg.scan_layers and remat == "none"
                     and not (backend == "tpu" and stages > 1) and not one_layer else 0.0)
    # (a ZeRO-3 layer on TPU reads the weights gathered in flight, counted in the copy)
    in_copy = backend == "tpu" and (stages > 1 or (b.gathered and not windowed and b.compute < b.master)
                                    or (one_layer and stage < 3))
    acts = activation_peak(cfg, compute, local_batch, seq_len, remat, tensor=mesh.get("tensor", 1),
                           layer_weight_bytes=0.0 if in_copy else layer_weights,
                           saved_weight_bytes=saved_weights, stages=stages,
                           microbatches=microbatches, backend=backend, repeats=repeats, dlogits=windowed,
                           onchip=onchip if backend == "tpu" else 0.0)
    peak = acts.total
    forward = acts.saved + acts.pipeline  # live at the forward loop's end, beside the compute copy
    if backend == "tpu" and stages == 1:
        # The backward pass in three phases, the peak the largest (read off XLA's live ranges
        # at the peak of samples #4 and #10 of benchmarks/estimate_vs_xla.py, and the buffer
        # assignment of #10 over time):
        # - the LM head's backward: only the head's gradient exists; the layers' [L, ...]
        #   weight gradients (the backward loop's outputs) and the embedding's do not yet;
        # - the layer loop: the layers' and the head's gradients, but not the embedding's:
        #   it is the scatter-add of the cotangent of the loop's input, so it is written
        #   after the loop, when the residuals are dead (#10: f32[32768, 512] born after the
        #   loop ends); with tied embeddings the head's share makes it exist from the start;
        # - after the loop: every gradient, no residuals (the update fuses, see below).
        head_grads = b.tree([p for p in table if p.name == "lm_head"], b.master, zero_sharded=stage >= 2)
        embed_grads = b.tree([p for p in table if p.name == "embedding"], b.master, zero_sharded=stage >= 2)
        loop = acts.saved + acts.layer - (0.0 if cfg.tie_embeddings else embed_grads)
        head_phase = acts.saved + acts.head + head_grads - grads
        peak = max(loop, head_phase, 0.0) + acts.pipeline
    if backend == "tpu" and stages > 1:
        chunk = cfg.num_layers // (stages * repeats)  # layers a tick runs (the inner layer scan)
        tick = acts.tick if chunk > 1 else 0.0
        head_phase, loop_phase = _tpu_pipeline_peak(table, acts, copy, tick, b, chunk)
        peak = max(head_phase, loop_phase) - grads - copy
        forward += _pipeline_views(table, b)
    elif stages > 1:
        peak += _pipeline_bytes(cfg, table, layer, remat, acts.workspace, repeats, b)
    backward = peak
    # The optimizer update, after the backward pass: train/step.py divides the gradients
    # by the loss scale (a new tree, as grads is sharded; the old one dies), then
    # clip_by_global_norm writes the clipped gradients (a tree sharded like Adam's moments)
    # before adamw reads them. When that tree outweighs the activations (remat, ZeRO-0) it
    # is the step's peak. The compute copy (the cast weights; ZeRO-3's gathered layers) is
    # dead by then, so that phase is gradients + the update tree alone.
    # XLA TPU fuses the divide and the clip into adamw's per-leaf update (one elementwise
    # fusion writing the donated params and moments), so no such tree exists there.
    update = b.tree(table, b.master, zero_sharded=stage >= 1)
    if backend != "tpu":
        peak = max(peak, update - copy)
    else:
        peak = max(peak, _update_layout_copies(table, b) - copy)
    if backend == "cpu" and not cfg.scan_layers and stages == 1:
        grads, peak = _cpu_unrolled(cfg, table, compute, local_batch, seq_len, layer_weights, copy, update, b)
    tokens = buffer_bytes((local_batch, seq_len), 4, backend)
    # What memory_analysis counts twice: its temp is 2 x heap - L, L the peak of the bytes
    # XLA's live ranges list, and they omit while-loop state (docs/capacity.md).
    if backend == "tpu" and stages == 1:
        # L phase by phase (read off the calibration dumps: #5, #13, #31, #41, #59 have L at
        # the first, #4, #25, #32, #37, #40 at the second, #46, #56 at the third):
        # - the forward loop's start: its [L, ...] stacks, zero-filled before the loop (listed
        #   then, not once they are loop state), beside the cast weights;
        # - the LM head's backward: its workspace and gradient beside the cast weights (the
        #   stacks are the forward loop's result then: unlisted);
        # - the backward layer loop: the layer's workspace and the gradients beside the cast
        #   weights (the stacks are loop state: unlisted).
        # memory_analysis reports the heap plus heap - L (nothing where a phase lists it all).
        heap = grads + copy + peak
        listed = max(acts.saved, acts.head + head_grads, acts.layer + grads) + copy
        twice = max(0.0, heap - listed)
    elif backend == "tpu" and peak == backward:
        # A pipeline: the forward tick loop's stacked residuals are listed while it writes
        # them (its end: `forward` + the compute copy) but not once they are the loop's
        # result, through the head's backward and the backward tick loop. So L = max(forward
        # end, backward peak - saved) and memory_analysis reports the heap plus min(saved,
        # backward peak - forward end): read off the dumps of pipelined samples #20 (16.0
        # GB), #47 (2.40), #17 (1.54), #26 (0.22), whose L is the forward's end or the head's
        # backward less the stacks.
        twice = min(acts.saved, max(backward + grads - forward, 0.0))
    else:
        twice = 0.0
    return TrainMemory(stage, master, grads, adam, copy, peak, 2 * tokens, twice)


def _update_layout_copies(table, b: _Bytes) -> float:
    """TPU: the update's extra buffers when the LM head's weight is stored transposed.

    XLA lays a parameter out with the two minor dims that pad least (buffers.buffer_bytes),
    so a [D, V] head whose V does not fill 128-lanes but whose D does is stored D-minor; its
    gradient comes out of the dot V-minor. The fused AdamW update of that leaf then runs in
    the gradient's layout: the weight and both moments are copied into it and the three
    results copied back, four head-sized f32 buffers beside every other gradient (sample
    #35: f32[1024, 50257]{1,0} copies of the {0,1} weight, mu and nu at the heap's top)."""
    def tiles(minor: int, rows: int) -> int:  # elements of a 2-D f32 array laid out in (8, 128) tiles
        return -(-minor // 128) * 128 * -(-rows // 8) * 8

    axes = MESH_AXES if b.stage >= 1 else ("data", "stage", "tensor")
    out = 0.0
    for p in (p for p in table if p.name == "lm_head"):
        d, v = shard_shape(p.shape, p.axes, b.mesh, default_rules(), axes)
        if tiles(d, v) < tiles(v, d):
            out += 4 * b.tree([p], b.master, zero_sharded=b.stage >= 1)
    return out


# XLA TPU's SPMD partitioner turns a weight gradient's matmul -> reduce-scatter over fsdp
# (ZeRO-2 and 3), and a ZeRO-3 weight's all-gather -> matmul, into a windowed loop over the
# fsdp shards once they are this many and the activations are large enough: seen at fsdp 8
# (samples #37 and #40 of benchmarks/estimate_vs_xla.py, ZeRO-3, 2048 tokens per chip; #37's
# config under ZeRO-2: 16 windowed reduce-scatter loops) and at 16 (#37's config on
# v5e:4x4), not at 4 (#24, #56, and #37's config on v5e:2x2), nor under ZeRO-1, whose
# gradients are not sharded (#4, #29: fsdp 8). Tokens per chip: #37's config (d_model 256)
# is windowed at 1024 and 2048, not at 128 or 512 (nor is configs/tiny.py at 128); whether
# the width moves that threshold is not measured.
WINDOWED_MIN_FSDP = 8
WINDOWED_MIN_TOKENS = 1024
# XLA's SPMD partitioner runs a windowed loop one iteration per shard and refuses more than
# SpmdPartitionerOptions.max_windowed_einsum_iteration (32): #19 (fsdp 64, ZeRO-3, 2048
# tokens per chip) has no windowed loop. Nor is there one when the batch is also split over
# data (#13: data 2 x fsdp 32 under ZeRO-2; #14: data 4 x fsdp 8 under ZeRO-3, 8192 tokens
# per chip): the weight gradient's contracted batch is then split data x fsdp ways while the
# gradient is sharded fsdp ways, which is not one of the partitioner's windowed patterns (the
# output's non-contracted dim split over every partition), so it reduces over data first.
WINDOWED_MAX_FSDP = 32


def collective_matmul(mesh: dict[str, int], stage: int, tokens: int, backend: str = "tpu") -> bool:
    """Whether XLA TPU compiles the weight gradients' reduce-scatters (ZeRO-2, 3) and ZeRO-3's
    all-gathers as windowed (collective) matmuls, for `tokens` per chip (local batch x length)."""
    return (backend == "tpu" and stage >= 2 and WINDOWED_MIN_FSDP <= mesh.get("fsdp", 1) <= WINDOWED_MAX_FSDP
            and mesh.get("data", 1) == 1 and tokens >= WINDOWED_MIN_TOKENS and mesh.get("stage", 1) == 1)


@dataclasses.dataclass(frozen=True)
class _Bytes:
    """What every term of train_memory counts with: the mesh, ZeRO stage, bytes per element
    of the master and compute dtypes, and the backend."""

    mesh: dict[str, int]
    stage: int
    master: float
    compute: float
    backend: str

    def tree(self, table, bytes_per_elem: float, zero_sharded: bool) -> float:
        return tree_bytes(table, bytes_per_elem, self.mesh, zero_sharded=zero_sharded, backend=self.backend)

    @property
    def gathered(self) -> bool:
        """ZeRO-3 over more than one fsdp device: layers are all-gathered where they are used."""
        return self.stage >= 3 and self.mesh.get("fsdp", 1) > 1


def _compute_copy_bytes(cfg: ModelConfig, table, b: _Bytes, windowed: bool = False) -> float:
    """Compute-dtype weights made inside the step."""
    c, stage = b.compute, b.stage
    copy = 0.0
    if windowed:
        # A windowed matmul multiplies one fsdp shard of the weight at a time while the next
        # is passed round the ring: the loop holds two shards, never the gathered weight.
        return 2 * max(b.tree([p], min(c, 2), zero_sharded=True) for p in table)
    if c < b.master:
        if stage >= 3:  # gathered just in time: one layer ahead plus the embedding and head
            copy = _gathered_copy_bytes(cfg, b.mesh, c, b.backend)
        elif b.backend == "cpu":
            copy = b.tree(table, c, zero_sharded=False)
    if b.backend == "tpu" and cfg.scan_layers and stage < 3 and (c < b.master or c > 2):
        # XLA TPU does fuse a weight's cast into the matmul that reads it, except in the
        # layer scan: it hoists the cast of the loop-invariant [L, ...] weights out of the
        # loop, one bf16 copy of the stacked weights that the forward and backward loops
        # slice. An f32 model's DEFAULT-precision matmuls read bf16 weights too (read off
        # the TPU HLO: bf16[L, ...] loop inputs). Under ZeRO-3 the cast stays per layer,
        # before the all-gather (the gathered copy above).
        copy += b.tree(stacked_params(table), min(c, 2), zero_sharded=False)
    return copy


def _saved_weight_bytes(cfg: ModelConfig, layer, remat: str, b: _Bytes) -> float:
    """A scanned layer's weight-shaped residuals (remat "none"), per layer.

    layers.dense reshapes the 3-D q/k/v/o weights to 2-D, a new value per scan step that
    autodiff stacks as a [L, ...] residual (the 2-D MLP weights are forwarded from the
    scan's inputs instead). Under bf16/fp16 the cast to the compute dtype is such a value
    for every weight. Sharded as the params are (ZeRO-3: the shard, gathered after the
    reshape). On TPU below ZeRO-3 the compiler hoists the cast and the reshape of every
    stacked weight out of the scan (the bf16 copy of _compute_copy_bytes), and the backward
    loop reads that copy: no weight residual is stacked (calibration samples #5 and #10 of
    benchmarks/estimate_vs_xla.py, bf16, remat none: one bf16 [L, D, F / tensor] stack per
    MLP weight and one 2-D [L, D, N H / tensor] per attention weight in the backward loop's
    state, beside the activation stacks; the estimate had counted them twice, +7% and +13%
    of their assignments). Under ZeRO-3 every weight's convert is stacked.
    """
    tpu = b.backend == "tpu"
    if tpu and b.stage < 3:
        return 0.0
    cast = b.compute < b.master or tpu
    reshaped = layer if cast else [p for p in layer if len(p.shape) == 3]
    return b.tree(reshaped, min(b.compute, 2) if tpu else b.compute, zero_sharded=b.stage >= 3)


def _pipeline_bytes(cfg: ModelConfig, table, layer, remat: str, workspace: float, repeats: int,
                    b: _Bytes) -> float:
    """GPipe (train/pipeline.py), beyond the activations."""
    per_stage = cfg.num_layers // b.mesh.get("stage", 1)
    stage_layers = stacked_params(table)
    # Each backward tick computes one layer's weight gradients (whole over fsdp) and adds
    # them into its batch shard's accumulator (gpipe's per-shard weight views): two
    # layer-sized buffers live together.
    tick_grads = 2 * b.tree(layer, b.master, zero_sharded=False)
    if remat == "none":  # live beside the layer's residual slices
        extra = tick_grads
    else:  # the recomputed layer is dead by then (XLA's peak is the reduction after the loop)
        extra = max(0.0, tick_grads - workspace)
    if per_stage > 1 or b.gathered:
        # params viewed as [S, L/S, ...]: XLA all-gathers this stage's layers over fsdp
        # once per step (hoisted out of the tick loop), whole for the whole step.
        extra += b.tree(stage_layers, b.compute, zero_sharded=False)
    if per_stage > 1:
        # the gradient of that copy: the inner layer scan's stacked [L/S, ...]
        # gradients and the tick loop's accumulator, both whole over fsdp.
        extra += 2 * b.tree(stage_layers, b.master, zero_sharded=False)
    if repeats > 1:
        # circular: the stage's layers regrouped into [V, L/(S V), ...] chunks (an
        # all-to-all of the stored [L, ...] order) and that copy's gradient, both whole
        # over fsdp, for the whole step (read off the buffer assignment, tiny on 8 CPUs).
        extra += 2 * b.tree(stage_layers, b.master, zero_sharded=False)
    return extra


def _pipeline_copy_bytes(cfg: ModelConfig, table, b: _Bytes) -> float:
    """TPU: the compute-dtype weights a pipelined step makes (train/pipeline.py).

    The stage's layers, whole over fsdp, cast once (bf16 also under f32: DEFAULT-precision
    matmuls read bf16), as every batch shard's view of them is; under ZeRO-3 the embedding
    and the head are gathered and cast too (sample #26: bf16[256, 128256] head)."""
    copy = b.tree(stacked_params(table), min(b.compute, 2), zero_sharded=False)
    if b.gathered:
        copy += b.tree(end_params(cfg), min(b.compute, 2), zero_sharded=False)
    return copy


def _pipeline_views(table, b: _Bytes) -> float:
    """TPU pipeline: the f32 stage weights XLA keeps beside the master copy (_tpu_pipeline_peak)."""
    whole = b.tree(stacked_params(table), b.master, zero_sharded=False)
    if b.gathered:
        return whole
    if b.mesh.get("fsdp", 1) > 1 and b.stage in (1, 2):
        return whole + b.tree([p for p in table if p.name == "lm_head"], b.master, zero_sharded=False)
    return 0.0


# A pipelined step on TPU: XLA's scheduler defers the LM head's weight-gradient matmul past the
# backward tick loop, keeping the [B*T, V] logits through the loop instead of the gradient, once
# that f32 gradient (per chip, as the ZeRO stage shards it) is larger than this. Seen deferred at
# 206, 268 and 671 MB (fresh compiles p45b and p69b, sample #47: the logits live through the
# loop); not at 33, 67 and 131 MB (fresh p21, r69d = p69b at d_model 512, r21d = p21 at d_model
# 1024: the logits dead before it) nor at #33's 134,217,728 bytes (its estimate is 29% over
# with the logits kept). Why the scheduler flips there is not known; the bound is the largest
# seen not deferred.
DEFERRED_HEAD_GRAD_BYTES = 128 * 2**20


def _tpu_pipeline_peak(table, acts, copy: float, tick: float, b: _Bytes, chunk: int = 1) -> tuple[float, float]:
    """XLA TPU's peak bytes of a pipelined step beyond its arguments (train/pipeline.py), in its
    two candidate phases (the LM head's backward, the backward tick loop), read off the
    buffer assignments of samples #7, #26, #34, #47, #68 of benchmarks/estimate_vs_xla.py.

    Both phases hold every tick's residuals (acts.saved), the pipeline's [M, b, T, D] feed
    and result, and the stage's weights as the tick loop reads them, cast to the compute
    dtype once (`copy`, _pipeline_copy_bytes; each layer reads its slice in place, no
    per-layer copy). Under ZeRO-1 and 2 over fsdp (f32 weights whole, moments sharded) XLA
    also copies the stage's f32 weights and the head's at the step's start and keeps the
    copies to the end (#34: copy(param) of every f32 [14, ...] weight and the [3072, 32000]
    head; #7 likewise); not under ZeRO-0 (#47, #68). ZeRO-3 gathers the f32 stage weights.
    - The head's backward comes first: the logits (one [B*T, V] buffer: the SPMD partitioner
      makes no windowed matmul in a pipelined program, #7, #26, #71) and the head's weight
      gradient as its dot writes it, in the compute dtype and whole over fsdp (#26, #68). No
      layer gradient exists yet.
    - The backward tick loop: one layer's workspace and the f32 accumulator of the stage's
      weight gradients, whole over fsdp (each batch shard's own view's gradient, summed over
      the shards only after the loop: #34's f32 [14, 1, 1, ...] and #47's loop state), beside
      the head's gradient or, where smaller, the logits it is made from: the scheduler may
      defer the head's dW past the loop (#47 keeps its bf16 [4096, 32768] logits through the
      loop and writes the f32 head gradient after it), and does once that gradient is over
      DEFERRED_HEAD_GRAD_BYTES, however large the logits (p45b: bf16 [4, 4096, 50257], 1.65 GB,
      through the loop beside a 206 MB gradient). The reduced gradients come after.
      Under ZeRO-0 with more than one layer per tick (`chunk`), the loop holds that
      accumulator twice: the tick loop's [1, ..., L/(S V), ...] state and the inner layer
      scan's stacked [L/(S V), ...] gradients of the tick being differentiated, both f32 and
      whole (fresh compiles not in the sample: p45b, stage 2 x fsdp 4, 8 layers a tick, and
      p69b, data 4 x stage 4, 2 layers a tick, both live at their backward peaks; the model
      counted one and was 13% under both assignments). Under ZeRO-1..3 the tick accumulator
      is not whole beside the inner stack (#34's dump: 7.66 GB under the inner stack's values,
      2.38 GB under the accumulator's), and counting it whole put #8 and #63 11-13% over
      theirs, so it is counted there as before.
    """
    stage_layers = stacked_params(table)
    whole = b.tree(stage_layers, b.master, zero_sharded=False)
    head = [p for p in table if p.name == "lm_head"]
    weights = acts.saved + acts.pipeline + _pipeline_views(table, b) + copy
    head_phase = weights + acts.head + b.tree(head, b.compute, zero_sharded=False)
    head_grad = min(b.tree(head, b.master, zero_sharded=b.stage >= 2), acts.head)
    if b.tree(head, 4, zero_sharded=b.stage >= 2) > DEFERRED_HEAD_GRAD_BYTES:  # dW after the loop
        head_grad = acts.head
    grad_sets = 2 if b.stage == 0 and chunk > 1 else 1
    # `tick`: with remat none and more than one layer per stage, each backward tick copies its
    # residuals of every layer of the stage out of the [ticks, ...] stacks for the inner
    # layer loop to read (#20: f32 [2, 1, 4, 1, 8, 4096, 4096] scores and every other
    # residual, sliced for the tick, live through the tick's backward; not with one layer
    # per stage, #47, whose slices fuse into their readers).
    loop_phase = weights + acts.layer + grad_sets * whole + head_grad + tick
    return head_phase, loop_phase


def _cpu_unrolled(cfg: ModelConfig, table, compute: str, local_batch: int, seq_len: int,
                  layer_weights: float, copy: float, update: float, b: _Bytes) -> tuple[float, float]:
    """(gradients, activations) of unrolled layers on XLA CPU (read off its buffer
    assignment, tiny on 8 devices):

    - the gradients are not reduced per layer: XLA combines the whole unrolled tree into
      one all-reduce at the end (whole over fsdp whatever the ZeRO stage; a ZeRO-2/3 shard
      is sliced out of the result), so that collective holds two whole gradient trees (its
      input and its output).
    - the backward pass holds no whole gradient tree: each layer's weight gradients appear
      as its residuals die, so its peak is the residuals of every layer, the layer being
      differentiated and the embedding / head gradients.
    - remat barely shrinks it: with the layers unrolled the scheduler is free to recompute
      each checkpointed layer as soon as its input exists, and it does (XLA's temp: 13.7 MB
      under `none`, 13.2 under `nothing_saveable`, fsdp8).
    """
    whole = b.tree(table, b.master, zero_sharded=False)
    # (an unrolled layer reads its weights in place; ZeRO-3 gathers them)
    gathered = layer_weights if b.gathered else 0.0
    unrolled = activation_peak(cfg, compute, local_batch, seq_len, "none", tensor=b.mesh.get("tensor", 1),
                               layer_weight_bytes=gathered, backend=b.backend).total
    backward = unrolled + b.tree(end_params(cfg), b.master, zero_sharded=False)
    # the update (ZeRO-0/1): the reduced tree, `g / scale` and the clipped tree
    update_phase = whole + 2 * update if b.stage < 2 else 0.0
    return whole, max(backward + copy, 2 * whole, update_phase) - whole - copy


def _gathered_copy_bytes(cfg: ModelConfig, mesh: dict[str, int], elem: float, backend: str = "cpu") -> float:
    """ZeRO-3's live compute-dtype weights: two layers in flight plus embedding and head (CPU).

    TPU: XLA all-gathers each weight on its own (an async all-gather per matmul, scheduled
    just ahead of its reader) and frees it after its last reader, so the step holds at most
    the weight being read and the next one: two of the largest single weight, whole over
    fsdp, split over tensor (a fresh d_model 8192 compile, ZeRO-3 over fsdp 32 on v5e:4x8:
    two bf16 [8192, 28672] MLP weights at the peak, no other gathered weight; #2's HLO: one
    all-gather per [1, 4096, 7168] matrix)."""
    if backend == "tpu":
        return 2 * max(tree_bytes([p], elem, mesh, zero_sharded=False, backend=backend)
                       for p in layer_params(cfg) + end_params(cfg))
    return (2 * tree_bytes(layer_params(cfg), elem, mesh, zero_sharded=False, backend=backend)
            + tree_bytes(end_params(cfg), elem, mesh, zero_sharded=False, backend=backend))


def min_chips(need: callable, capacity: float, limit: int = 65536) -> int | None:
    """The fewest chips n (a power of two) with need(n) <= capacity, or None."""
    n = 1
    while n <= limit:
        if need(n) <= capacity:
            return n
        n *= 2
    return None
