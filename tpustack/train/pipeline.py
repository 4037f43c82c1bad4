"""The pipeline schedule over the mesh's `stage` axis: GPipe and its circular variant.

The model knows no schedule: a `Pipeline` is handed to the Decoder (its `pipeline`
field), which calls it on the stacked layer weights in place of its scan over layers.
Checkpoints and the estimator see the same [L, ...] layer tree either way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec

from tpustack.config import ModelConfig
from tpustack.model.layers import rope_tables
from tpustack.model.transformer import ACT_BTD, block_class


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """S stages x M microbatches (x V repeats: circular); the Decoder's `pipeline` field."""

    stages: int
    microbatches: int
    repeats: int = 1

    def __call__(self, cfg: ModelConfig, layer_params, x_BTD: jax.Array) -> jax.Array:
        return gpipe(cfg, layer_params, x_BTD, self.stages, self.microbatches, self.repeats)

    @property
    def bubble(self) -> float:
        return pipeline_bubble(self.stages, self.microbatches, self.repeats)


def gpipe(cfg: ModelConfig, layer_params, x_BTD: jax.Array, stages: int, microbatches: int,
          repeats: int = 1) -> jax.Array:
    """Run the stacked layers as a pipeline over the mesh's `stage` axis: S stages, M microbatches.

    GPipe (repeats V = 1): the [L, ...] layer weights are viewed as [S, L/S, ...]; the rules
    shard that leading axis over `stage`, so device group s holds layers [s L/S, (s+1) L/S).
    Each of the M + S - 1 ticks runs every stage once (a vmap over the stage axis that the
    SPMD partitioner splits across the stage groups), then shifts each stage's output to
    the next stage (a collective permute). Stage s works on microbatch (tick - s); the
    other ticks are the bubble, (S-1)/(M+S-1) of the time, computing on data that is
    thrown away. The backward pass is autodiff's reverse of the same loop.

    Circular (V > 1, M a multiple of S): the layers are cut into S V chunks; stage s holds
    chunks s, S + s, ..., so a microbatch goes round the ring of stages V times, re-entering
    stage 0 straight from stage S-1. Ticks: V M + S - 1; bubble (S-1)/(V M + S - 1). The
    chunks are regrouped from the stored [L, ...] order once per step (an all-to-all over
    `stage` of the weights, and back for their gradients): the checkpoint layout does not
    depend on the schedule.

    Microbatch m takes rows m, M + m, ... of the batch, so each device keeps its own rows.
    Gradients are reduced across the batch shards once per step, not once per tick: each
    of the n batch shards (data x fsdp) runs on its own view of the stage's weights, a
    broadcast [S, n, ...] split over the batch axes (a second vmap). Its per-shard
    gradients accumulate locally through the tick loop, and the broadcast's transpose (a
    sum over n) is the one all-reduce / reduce-scatter after it. Without this XLA reduced
    every tick's weight gradients inside the loop, M + S - 1 times the traffic.
    """
    S, M, V = stages, microbatches, repeats
    B, T, D = x_BTD.shape
    if B % M:
        raise ValueError(f"batch {B} is not divisible by {M} pipeline microbatches")
    if V > 1 and M % S:
        raise ValueError(f"a circular pipeline needs microbatches ({M}) to be a multiple of stages ({S})")
    b = B // M
    x_MbTD = jnp.swapaxes(x_BTD.reshape(b, M, T, D), 0, 1)
    x_MbTD = nn.with_logical_constraint(x_MbTD, (None, *ACT_BTD))
    params_S, run_stages = _stage_runner(cfg, layer_params, S, V, b, T, D)
    stage_axes = ("act_stage", *ACT_BTD)
    stage_S = jnp.arange(S)

    def schedule(k):
        """Item k of a stage's work -> (microbatch, repeat): groups of S microbatches go round V times."""
        group, within = k // (S * V), k % (S * V)
        return group * S + within % S, within // S

    def tick(carry, i):
        state_SbTD, out_MbTD = carry
        m0, r0 = schedule(i)
        feed_bTD = jax.lax.dynamic_index_in_dim(x_MbTD, jnp.minimum(m0, M - 1), keepdims=False)
        # stage s takes stage s-1's last output; stage 0 a new microbatch (repeat 0) or, in a
        # circular pipeline, stage S-1's output for its next round.
        if V > 1:
            passed_SbTD = jnp.roll(state_SbTD, 1, axis=0)
        else:  # a shift, not a roll: the last stage's output needs no wrap-around permute
            passed_SbTD = jnp.pad(state_SbTD[:-1], ((1, 0), (0, 0), (0, 0), (0, 0)))
        take_new = (stage_S == 0) & (r0 == 0)
        in_SbTD = jnp.where(take_new[:, None, None, None], feed_bTD[None], passed_SbTD)
        in_SbTD = nn.with_logical_constraint(in_SbTD, stage_axes)
        _, repeat_S = schedule(jnp.clip(i - stage_S, 0, V * M - 1))
        state_SbTD = nn.with_logical_constraint(run_stages(params_S, in_SbTD, repeat_S), stage_axes)
        k_last = i - (S - 1)  # the item the last stage just finished, if >= 0
        m_last, r_last = schedule(jnp.maximum(k_last, 0))
        slot = jnp.clip(m_last, 0, M - 1)
        old_bTD = jax.lax.dynamic_index_in_dim(out_MbTD, slot, keepdims=False)
        finished = (k_last >= 0) & (r_last == V - 1)
        new_bTD = jnp.where(finished, state_SbTD[S - 1], old_bTD)  # select one slot, update in place
        return (state_SbTD, jax.lax.dynamic_update_index_in_dim(out_MbTD, new_bTD, slot, 0)), None

    state_SbTD = nn.with_logical_constraint(jnp.zeros((S, b, T, D), x_BTD.dtype), stage_axes)
    (_, out_MbTD), _ = jax.lax.scan(tick, (state_SbTD, jnp.zeros_like(x_MbTD)), jnp.arange(V * M + S - 1))
    return jnp.swapaxes(out_MbTD, 0, 1).reshape(B, T, D)


def _stage_runner(cfg: ModelConfig, layer_params, S: int, V: int, b: int, T: int, D: int):
    """(weights viewed per stage [S, (n,) V, L/(S V), ...], fn(params_S, x_SbTD, repeat_S) that
    runs every stage's current layer chunk on its [b, T, D] input, vmapped over the stages)."""
    # [L, ...] -> [S, V, L/(S V), ...] with layer (v S + s) L/(S V) + j at [s, v, j]. For V = 1
    # this is a plain split that keeps every [L] shard in place.
    def chunked(p):
        return jnp.swapaxes(p.reshape(V, S, p.shape[0] // (S * V), *p.shape[1:]), 0, 1)
    params_S = jax.tree.map(chunked, layer_params)
    block = block_class(cfg)(cfg, parent=None)
    batch_axes, n = _batch_mesh_axes()
    n = n if n > 1 and b % n == 0 else 1
    rows = b // n
    positions_rT = jnp.broadcast_to(jnp.arange(T), (rows, T))
    cos_rTH, sin_rTH = rope_tables(positions_rT, cfg.heads_dim, cfg.rope_theta)

    def run_stage(stage_params, x_rTD, repeat):
        if V == 1:
            chunk = jax.tree.map(lambda p: p[0], stage_params)
        else:  # named, so the backward re-slices it instead of keeping every tick's weight copy
            chunk = jax.tree.map(lambda p: checkpoint_name(jax.lax.dynamic_index_in_dim(p, repeat, keepdims=False),
                                                           "pipeline_chunk"), stage_params)

        def layer(x, p):
            return block.apply({"params": p}, x, cos_rTH, sin_rTH), None
        return jax.lax.scan(layer, x_rTD, chunk)[0]

    if V > 1:
        run_stage = jax.checkpoint(run_stage, policy=jax.checkpoint_policies.save_anything_except_these_names(
            "pipeline_chunk"))

    if n > 1 or V > 1:  # weights constrained per chunk, and per batch shard when there are several
        shard_axes = batch_axes if n > 1 else None
        specs = _per_shard_weight_specs(cfg, block, batch_axes, shard_axes)
        params_S = jax.tree.map(
            lambda p, spec: jax.lax.with_sharding_constraint(jnp.broadcast_to(p[:, None], (S, n, *p.shape[1:])), spec),
            params_S, specs)
        inner_rules = tuple((name, None if name == "batch" and n > 1 else axes)
                            for name, axes in nn.get_logical_axis_rules())

        def run_shard(stage_params, x_rTD, repeat):
            with nn.logical_axis_rules(inner_rules):  # the vmap owns the batch axes here
                return run_stage(stage_params, x_rTD, repeat)

        per_shard = jax.vmap(run_shard, in_axes=(0, 0, None), spmd_axis_name=shard_axes)

        def run_one_stage(stage_params, x_bTD, repeat):
            return per_shard(stage_params, x_bTD.reshape(n, rows, T, D), repeat).reshape(b, T, D)
    else:
        run_one_stage = run_stage
    return params_S, jax.vmap(run_one_stage, spmd_axis_name="stage")


def _batch_mesh_axes() -> tuple[tuple[str, ...], int]:
    """The mesh axes the rules split `batch` over, and how many ways (1 off a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return (), 1
    axes = nn.logical_to_mesh_axes(("batch",))[0]
    axes = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a)
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return axes, n


def _per_shard_weight_specs(cfg: ModelConfig, block: nn.Module, batch_axes: tuple[str, ...],
                            shard_axes: tuple[str, ...] | None):
    """PartitionSpecs of the [S, n, V, L/(S V), ...] per-shard weight views: stage, the batch
    axes (`shard_axes`, None when n = 1), then each weight's own rule; the batch axes are
    removed from it when they split n (or the batch is replicated for an indivisible n)."""
    h = cfg.heads_dim
    x, c = jnp.zeros((1, 1, cfg.d_model)), jnp.zeros((1, 1, h))
    with nn.logical_axis_rules(()):
        boxed = jax.eval_shape(lambda: block.init(jax.random.key(0), x, c, c))
    logical = nn.get_partition_spec(boxed)["params"]
    taken = batch_axes if shard_axes else ()

    def spec(names):
        out = []
        for axes in nn.logical_to_mesh_axes(tuple(names)):
            kept = tuple(a for a in (axes if isinstance(axes, tuple) else (axes,)) if a and a not in taken)
            out.append(kept[0] if len(kept) == 1 else (kept or None))
        return PartitionSpec("stage", shard_axes, None, None, *out)

    return jax.tree.map(spec, logical, is_leaf=lambda v: isinstance(v, PartitionSpec))


def pipeline_bubble(stages: int, microbatches: int, repeats: int = 1) -> float:
    """The idle fraction of a pipeline step: (S - 1) / (V M + S - 1); V = 1 is GPipe."""
    return (stages - 1) / (repeats * microbatches + stages - 1)
