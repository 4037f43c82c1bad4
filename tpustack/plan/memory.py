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
import itertools
import math
from typing import Any, Sequence

from tpustack.config import ModelConfig

GB = 1e9
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp32": 4, "bf16": 2, "fp16": 2,
               "int8": 1, "fp8": 1, "int4": 0.5}
COMPUTE_DTYPE = {"f32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # train.precision

# Bytes per parameter of stored weights. int8 adds one f32 scale per output channel
# (counted exactly in weight_bytes_for); nf4 (QLoRA) stores 4-bit codes plus one fp32
# absmax per 64-weight block: 4 + 32/64 = 4.5 bits.
WEIGHT_FORMATS = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5, "nf4": 4.5 / 8}
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


# ---------------------------------------------------------------------------- parameter table
@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]  # logical names, as tpustack/model annotates them


def param_table(cfg: ModelConfig) -> list[Param]:
    """Every parameter of tpustack.model.Decoder with its shape and logical axes."""
    d, f, n, k, h, v = cfg.d_model, cfg.ffn_dim, cfg.num_heads, cfg.num_kv_heads, cfg.heads_dim, cfg.vocab_size
    layer = [
        Param("attn_norm/scale", (d,), ("norm",)),
        Param("attn/q", (d, n, h), ("embed", "heads", "head_dim")),
        Param("attn/k", (d, k, h), ("embed", "kv_heads", "head_dim")),
        Param("attn/v", (d, k, h), ("embed", "kv_heads", "head_dim")),
        Param("attn/o", (n, h, d), ("heads", "head_dim", "embed")),
        Param("mlp_norm/scale", (d,), ("norm",)),
        Param("mlp/gate", (d, f), ("embed", "mlp")),
        Param("mlp/up", (d, f), ("embed", "mlp")),
        Param("mlp/down", (f, d), ("mlp", "embed")),
    ]
    table = [Param("embedding", (v, d), ("vocab", "embed"))]
    if cfg.scan_layers:  # nn.scan stacks the layers on a leading `layers` axis
        table += [Param(f"layers/{p.name}", (cfg.num_layers, *p.shape), ("layers", *p.axes)) for p in layer]
    else:
        table += [Param(f"layer_{i}/{p.name}", p.shape, p.axes) for i in range(cfg.num_layers) for p in layer]
    table.append(Param("final_norm/scale", (d,), ("norm",)))
    if not cfg.tie_embeddings:
        table.append(Param("lm_head", (d, v), ("embed", "vocab")))
    return table


def default_rules() -> dict[str, Any]:
    """The logical -> mesh axis table of tpustack.mesh (the one table), as a dict."""
    from tpustack.mesh import RULES

    return dict(RULES["default"])


def shard_shape(shape: Sequence[int], axes: Sequence[str], mesh: dict[str, int], rules: dict[str, Any],
                sharded_axes: Sequence[str] = ("data", "stage", "fsdp", "tensor")) -> tuple[int, ...]:
    """Per-device shape: each dim divided by the mesh axes its logical name maps to (ceil)."""
    out = []
    for dim, name in zip(shape, axes):
        target = rules.get(name)
        names = target if isinstance(target, tuple) else ((target,) if target else ())
        ways = math.prod(mesh.get(a, 1) for a in names if a in sharded_axes)
        out.append(-(-dim // ways))
    return tuple(out)


def buffer_bytes(shape: Sequence[int], bytes_per_elem: float, backend: str = "cpu") -> float:
    """Bytes XLA allocates for one array of `shape` on `backend`.

    CPU: dense. TPU: every array is laid out in tiles over its two minor-most dimensions,
    (8, 128) 32-bit words: the minor dim pads to a multiple of 128, the second-minor to a
    multiple of 8 rows (16 for 2-byte types, two packed per word; a dim under that takes
    the smallest power-of-two tile that holds it, T(1|2|4, 128)). XLA TPU's layout
    assignment picks which two dims are minor; read off the compiled HLO it picks the pair
    that pads least (e.g. f32[384,24]{0,1:T(8,128)}, f32[3,24,6,32]{3,1,2,0:T(8,128)}),
    so that is what is counted. A 1-D array pads to a multiple of 128 (scalars are noise).
    """
    shape = [int(s) for s in shape]
    if backend != "tpu" or not shape:
        return math.prod(shape) * bytes_per_elem
    if len(shape) == 1:
        return -(-shape[0] // 128) * 128 * bytes_per_elem
    rows = max(1, int(8 * 4 // bytes_per_elem)) if bytes_per_elem >= 1 else 32

    def padded(i: int, j: int) -> int:
        minor = -(-shape[i] // 128) * 128
        s = shape[j]
        second = (1 << (s - 1).bit_length()) if s < rows else -(-s // rows) * rows
        return minor * second * math.prod(shape[k] for k in range(len(shape)) if k not in (i, j))

    return min(padded(i, j) for i, j in itertools.permutations(range(len(shape)), 2)) * bytes_per_elem


def tree_bytes(table: list[Param], bytes_per_elem: float, mesh: dict[str, int] | None = None,
               zero_sharded: bool = True, rules: dict[str, Any] | None = None, backend: str = "cpu") -> float:
    """Per-device bytes of a parameter-shaped tree; zero_sharded=False replicates it over fsdp.

    backend "tpu" counts each array with its (8, 128) tile padding (see buffer_bytes)."""
    mesh = mesh or {}
    rules = default_rules() if rules is None and mesh else (rules or {})
    axes = ("data", "stage", "fsdp", "tensor") if zero_sharded else ("data", "stage", "tensor")
    return sum(buffer_bytes(shard_shape(p.shape, p.axes, mesh, rules, axes), bytes_per_elem, backend)
               for p in table)


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
    """KV cache bytes (GQA-aware: K kv heads, not N); int8 adds one bf16 scale per token per head."""
    elems = 2 * context * cfg.num_layers * cfg.num_kv_heads * cfg.heads_dim * batch
    if kv_dtype == "int8":
        return elems + 2 * context * cfg.num_layers * cfg.num_kv_heads * batch * 2
    return elems * DTYPE_BYTES[kv_dtype]


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

    @property
    def state(self) -> float:
        """The persistent train state: what XLA counts as the step's arguments (minus the batch)."""
        return self.master + self.adam

    @property
    def total(self) -> float:
        return self.master + self.grads + self.adam + self.compute_copy + self.activations + self.batch


def train_memory(cfg: ModelConfig, precision: str, mesh: dict[str, int], stage: int,
                 batch: int, seq_len: int, remat: str | None = None, backend: str = "tpu",
                 microbatches: int = 4, repeats: int = 1) -> TrainMemory:
    """Our layout's per-device training bytes for ZeRO `stage` (0..3) sharding over mesh['fsdp'].

    backend "tpu": the cast to the compute dtype fuses into each matmul, except that the
    layer scan's stacked weights are cast once, hoisted out of the loop (below ZeRO-3), and
    ZeRO-3 gathers cast layers; every array is counted with its (8, 128) tile padding.
    "cpu": XLA CPU materialises the cast copy and keeps bf16 activations in f32.
    microbatches: GPipe microbatches (parallel.microbatches), used when mesh['stage'] > 1;
    repeats: layer chunks per stage of a circular pipeline (parallel.pipeline_repeats).

    `activations` is everything at the step's peak beyond the gradients and the compute
    copy: the backward pass's residuals and workspace, or the optimizer update's workspace
    tree where that is larger (see below).
    """
    from tpustack.plan.activations import activations as activation_peak

    table = param_table(cfg)
    master_b = DTYPE_BYTES[cfg.param_dtype]
    compute = COMPUTE_DTYPE[precision]
    c = DTYPE_BYTES[compute]
    master = tree_bytes(table, master_b, mesh, zero_sharded=stage >= 3, backend=backend)
    grads = tree_bytes(table, master_b, mesh, zero_sharded=stage >= 2, backend=backend)
    adam = 2 * tree_bytes(table, 4, mesh, zero_sharded=stage >= 1, backend=backend)
    copy = 0.0
    if c < master_b:
        if stage >= 3:  # gathered just in time: one layer ahead plus the embedding and head
            copy = _gathered_copy_bytes(cfg, mesh, c, backend)
        elif backend == "cpu":
            copy = tree_bytes(table, c, mesh, zero_sharded=False, backend=backend)
    if backend == "tpu" and cfg.scan_layers and stage < 3 and (c < master_b or c > 2):
        # XLA TPU does fuse a weight's cast into the matmul that reads it, except in the
        # layer scan: it hoists the cast of the loop-invariant [L, ...] weights out of the
        # loop, one bf16 copy of the stacked weights that the forward and backward loops
        # slice. An f32 model's DEFAULT-precision matmuls read bf16 weights too (read off
        # the TPU HLO: bf16[L, ...] loop inputs). Under ZeRO-3 the cast stays per layer,
        # before the all-gather (the gathered copy above).
        stacked = [p for p in table if p.axes and p.axes[0] == "layers"]
        copy += tree_bytes(stacked, min(c, 2), mesh, zero_sharded=False, backend=backend)

    one = dataclasses.replace(cfg, num_layers=1, scan_layers=False)
    layer = [p for p in param_table(one) if p.name.startswith("layer_0/")]
    # One layer's weights as its matmuls read them: whole over fsdp (ZeRO-3 all-gathers
    # them, ZeRO-0..2 slice them out of the stacked [L, ...] weights), split over tensor.
    layer_weights = tree_bytes(layer, c, mesh, zero_sharded=False, backend=backend)
    # A scanned layer's weight-shaped residuals: layers.dense reshapes the 3-D q/k/v/o
    # weights to 2-D, a new value per scan step that autodiff stacks as a [L, ...] residual
    # (the 2-D MLP weights are forwarded from the scan's inputs instead). Under bf16/fp16
    # the cast to the compute dtype is such a value for every weight. Sharded as the
    # params are (ZeRO-3: the shard, gathered after the reshape).
    # On TPU an f32 model's matmuls read bf16 converts of the weights (DEFAULT precision),
    # which the compiler inserts: below ZeRO-3 it hoists them out of the scan (the stacked
    # copy above), and that copy serves as the 2-D weights' residual, so again only the
    # reshaped q/k/v/o are stacked (in bf16); under ZeRO-3 every weight's convert is.
    saved_weights = 0.0
    if cfg.scan_layers and (remat or cfg.remat_policy) == "none":
        cast = c < master_b or (backend == "tpu" and stage >= 3)
        reshaped = layer if cast else [p for p in layer if len(p.shape) == 3]
        saved_weights = tree_bytes(reshaped, min(c, 2) if backend == "tpu" else c, mesh,
                                   zero_sharded=stage >= 3, backend=backend)
    stages = mesh.get("stage", 1)
    ways = mesh.get("data", 1) * mesh.get("fsdp", 1)
    acts = activation_peak(cfg, compute, -(-batch // ways), seq_len, remat or cfg.remat_policy,
                           tensor=mesh.get("tensor", 1), layer_weight_bytes=layer_weights,
                           saved_weight_bytes=saved_weights, stages=stages, microbatches=microbatches, backend=backend,
                           repeats=repeats)
    peak = acts.total
    if stages > 1:
        # GPipe (model/transformer.py `gpipe`), beyond the activations:
        per_stage = cfg.num_layers // stages
        stage_layers = [p for p in table if p.axes and p.axes[0] == "layers"]
        # Each backward tick computes one layer's weight gradients (whole over fsdp) and adds
        # them into its batch shard's accumulator (gpipe's per-shard weight views): two
        # layer-sized buffers live together.
        tick_grads = 2 * tree_bytes(layer, master_b, mesh, zero_sharded=False, backend=backend)
        if (remat or cfg.remat_policy) == "none":  # live beside the layer's residual slices
            peak += tick_grads
        else:  # the recomputed layer is dead by then (XLA's peak is the reduction after the loop)
            peak += max(0.0, tick_grads - acts.workspace)
        if per_stage > 1 or (stage >= 3 and mesh.get("fsdp", 1) > 1):
            # params viewed as [S, L/S, ...]: XLA all-gathers this stage's layers over fsdp
            # once per step (hoisted out of the tick loop), whole for the whole step.
            peak += tree_bytes(stage_layers, c, mesh, zero_sharded=False, backend=backend)
        if per_stage > 1:
            # the gradient of that copy: the inner layer scan's stacked [L/S, ...]
            # gradients and the tick loop's accumulator, both whole over fsdp.
            peak += 2 * tree_bytes(stage_layers, master_b, mesh, zero_sharded=False, backend=backend)
        if repeats > 1:
            # circular: the stage's layers regrouped into [V, L/(S V), ...] chunks (an
            # all-to-all of the stored [L, ...] order) and that copy's gradient, both whole
            # over fsdp, for the whole step (read off the buffer assignment, tiny on 8 CPUs).
            peak += 2 * tree_bytes(stage_layers, master_b, mesh, zero_sharded=False, backend=backend)
    # The optimizer update, after the backward pass: train/step.py divides the gradients
    # by the loss scale (a new tree, as grads is sharded; the old one dies), then
    # clip_by_global_norm writes the clipped gradients (a tree sharded like Adam's moments)
    # before adamw reads them. When that tree outweighs the activations (remat, ZeRO-0) it
    # is the step's peak. The compute copy (the cast weights; ZeRO-3's gathered layers) is
    # dead by then, so that phase is gradients + the update tree alone.
    # XLA TPU fuses the divide and the clip into adamw's per-leaf update (one elementwise
    # fusion writing the donated params and moments), so no such tree exists there.
    update = tree_bytes(table, master_b, mesh, zero_sharded=stage >= 1, backend=backend)
    if backend != "tpu":
        peak = max(peak, update - copy)
    if backend == "cpu" and not cfg.scan_layers and stages == 1:
        # Unrolled layers on XLA CPU (read off its buffer assignment, tiny on 8 devices):
        # - the gradients are not reduced per layer: XLA combines the whole unrolled tree
        #   into one all-reduce at the end (whole over fsdp whatever the ZeRO stage; a
        #   ZeRO-2/3 shard is sliced out of the result), so that collective holds two
        #   whole gradient trees (its input and its output).
        # - the backward pass holds no whole gradient tree: each layer's weight gradients
        #   appear as its residuals die, so its peak is the residuals of every layer, the
        #   layer being differentiated and the embedding / head gradients.
        # - remat barely shrinks it: with the layers unrolled the scheduler is free to
        #   recompute each checkpointed layer as soon as its input exists, and it does
        #   (XLA's temp: 13.7 MB under `none`, 13.2 under `nothing_saveable`, fsdp8).
        whole = tree_bytes(table, master_b, mesh, zero_sharded=False, backend=backend)
        ends = [p for p in table if not p.name.startswith("layer_")]
        # (an unrolled layer reads its weights in place; ZeRO-3 gathers them)
        gathered = layer_weights if stage >= 3 and mesh.get("fsdp", 1) > 1 else 0.0
        unrolled = activation_peak(cfg, compute, -(-batch // ways), seq_len, "none",
                                   tensor=mesh.get("tensor", 1), layer_weight_bytes=gathered,
                                   backend=backend).total
        backward = unrolled + tree_bytes(ends, master_b, mesh, zero_sharded=False, backend=backend)
        # the update (ZeRO-0/1): the reduced tree, `g / scale` and the clipped tree
        update_phase = whole + 2 * update if stage < 2 else 0.0
        grads = whole
        peak = max(backward + copy, 2 * whole, update_phase) - grads - copy
    tokens = buffer_bytes((-(-batch // ways), seq_len), 4, backend)
    return TrainMemory(stage, master, grads, adam, copy, peak, 2 * tokens)


def _gathered_copy_bytes(cfg: ModelConfig, mesh: dict[str, int], elem: float, backend: str = "cpu") -> float:
    """ZeRO-3's live compute-dtype weights: two layers in flight plus embedding and head."""
    one = dataclasses.replace(cfg, num_layers=1, scan_layers=False)
    per_layer = [p for p in param_table(one) if p.name.startswith("layer_0/")]
    ends = [p for p in param_table(one) if not p.name.startswith("layer_0/")]
    return (2 * tree_bytes(per_layer, elem, mesh, zero_sharded=False, backend=backend)
            + tree_bytes(ends, elem, mesh, zero_sharded=False, backend=backend))


def min_chips(need: callable, capacity: float, limit: int = 65536) -> int | None:
    """The fewest chips n (a power of two) with need(n) <= capacity, or None."""
    n = 1
    while n <= limit:
        if need(n) <= capacity:
            return n
        n *= 2
    return None
