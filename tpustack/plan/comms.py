"""Analytic bytes each device sends per training step, by parallelism axis (chapter 30.2).

Ring algorithms: an all-reduce of X bytes over n devices sends 2 (n-1)/n X per device, an
all-gather or reduce-scatter (n-1)/n X (X the full array). Per-device parameter bytes W
are the fp32 master tree as sharded over `tensor` and `stage` (what the data-parallel
devices of one model replica hold between them).

- data / ZeRO over fsdp: ZeRO-0 and ZeRO-1 all-reduce W over data x fsdp (ZeRO-1 then
  all-gathers the updated shards, (n-1)/n W); ZeRO-2 reduce-scatters W and all-gathers
  the updated shards; ZeRO-3 all-gathers W in the forward pass and again in the backward
  (the gathered layer is not kept) and reduce-scatters the gradients. `data` adds an
  all-reduce of each fsdp shard's gradient across the replicas.
- tensor (Megatron): per layer two all-reduces of the [b, T, D] activation forward (after
  o and down) and, as XLA partitions our separate q/k/v and gate/up projections, five
  [b, T, D] input-gradient partials backward; plus the vocab-parallel embedding (one
  forward) and LM head input gradient (one backward). The loss moves [b, T] scalars only.
- stage (GPipe): every one of the M + S - 1 ticks shifts one microbatch activation
  [b/M, T, D] to the next stage forward and its gradient back (collective permutes),
  and broadcasts the last stage's output (an all-reduce over stage) forward and back.
  Weight gradients are reduced once per step, as without a pipeline (model.gpipe keeps
  per-batch-shard gradients through the tick loop).
"""

from __future__ import annotations

from tpustack.config import ModelConfig
from tpustack.dtypes import itemsize
from tpustack.plan.buffers import param_table, tree_bytes


def _ar(n: int, x: float) -> float:
    return 2 * (n - 1) / n * x if n > 1 else 0.0


def _ag(n: int, x: float) -> float:
    return (n - 1) / n * x if n > 1 else 0.0


def step_collective_bytes(cfg: ModelConfig, mesh: dict[str, int], zero_stage: int, batch: int, seq_len: int,
                          microbatches: int = 1, compute_dtype: str = "float32", repeats: int = 1) -> dict[str, float]:
    """Bytes one device sends per step: {"data": ..., "tensor": ..., "stage": ...}."""
    data, fsdp = mesh.get("data", 1), mesh.get("fsdp", 1)
    tensor, stages = mesh.get("tensor", 1), mesh.get("stage", 1)
    w = tree_bytes(param_table(cfg), itemsize(cfg.param_dtype), {"tensor": tensor, "stage": stages})
    out = {"data": 0.0, "tensor": 0.0, "stage": 0.0}
    # gradients and parameters across the data-parallel devices
    if zero_stage <= 1 or fsdp == 1:
        out["data"] += _ar(data * fsdp, w)
        if zero_stage == 1 and fsdp > 1:
            out["data"] += _ag(fsdp, w)
    else:
        out["data"] += _ag(fsdp, w)  # reduce-scatter of the gradients
        # gathers: ZeRO-2 the updated params; ZeRO-3 each layer in the forward and again in the
        # backward, except under a pipeline, where XLA gathers the stage's layers once per step
        # (hoisted out of the tick loop)
        out["data"] += _ag(fsdp, w) * (2 if zero_stage == 3 and stages == 1 else 1)
        out["data"] += _ar(data, w / fsdp)
    # activations across tensor
    b = batch / (data * fsdp)
    act = b * seq_len * cfg.d_model * itemsize(compute_dtype)
    if stages > 1:  # every tick runs each stage's L/(S V) layers on one microbatch (bubble ticks too)
        ticks = repeats * microbatches + stages - 1
        mb = act / microbatches
        layer_acts = cfg.num_layers / (stages * repeats) * ticks * 7 * mb
        out["stage"] = ticks * 2 * (mb + _ar(stages, mb))
    else:
        layer_acts = cfg.num_layers * 7 * act
    out["tensor"] = _ar(tensor, layer_acts + 2 * act)
    return out
