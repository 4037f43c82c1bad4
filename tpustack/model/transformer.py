"""The decoder: embedding -> L x (norm, attention, norm, SwiGLU) -> norm -> LM head.

Scan over layers (`model.scan_layers`) stacks layer weights on a leading `layers` axis and
compiles one block; remat (`model.remat_policy`) names a jax.checkpoint_policies entry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from tpustack.config import ModelConfig
from tpustack.model.layers import MLP, Attention, RMSNorm, dense, linear, param, rope_tables

ACT_BTD = ("batch", "length", "act_embed")


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array,
                 positions_BT: jax.Array | None = None, cache=None, prefill: bool = False):
        x_BTD = nn.with_logical_constraint(x_BTD, ACT_BTD)
        attn = Attention(self.cfg, name="attn")(RMSNorm(self.cfg, name="attn_norm")(x_BTD), cos_BTH, sin_BTH,
                                                 positions_BT, cache, prefill)
        if cache is not None:
            attn, cache = attn
        h_BTD = x_BTD + attn
        out_BTD = h_BTD + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="mlp_norm")(h_BTD))
        out_BTD = nn.with_logical_constraint(out_BTD, ACT_BTD)
        return out_BTD if cache is None else (out_BTD, cache)


class ScannedBlock(nn.Module):
    """Block with the (carry, xs) -> (carry, ys) signature nn.scan wants."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD, cos_BTH, sin_BTH):
        return block_class(self.cfg)(self.cfg, name="block")(x_BTD, cos_BTH, sin_BTH), None


def block_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat_policy == "none":
        return Block
    policy = getattr(jax.checkpoint_policies, cfg.remat_policy)
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """tokens [B, T] (and optional positions [B, T]) -> logits [B, T, V].

    With `cache` (a tuple of per-layer LayerCaches, see tpustack.infer.cache) it returns
    (logits, new cache): keys/values are written at `positions_BT`. `prefill=True` says the
    tokens are whole prompts from position 0, so attention needs only their own keys. Decoding runs the
    layers unrolled (see `unstack_layers`): per-layer caches stay separate buffers that
    update in place, where slicing a stacked cache inside a loop would copy it.
    """

    cfg: ModelConfig
    stages: int = 1  # pipeline stages over the mesh's `stage` axis (training; needs scan_layers)
    microbatches: int = 1  # GPipe microbatches per call when stages > 1
    repeats: int = 1  # circular pipeline: each stage holds this many layer chunks (1: GPipe)

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, cache=None,
                 prefill: bool = False):
        cfg = self.cfg
        pipelined = self.stages > 1 and cache is None and not self.is_initializing()
        if pipelined and positions_BT is not None:
            raise ValueError("the pipelined decoder trains on whole sequences: pass no positions")
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embedding_VD = param(self, "embedding", (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        x_BTD = jnp.take(embedding_VD, tokens_BT, axis=0)
        cos_BTH, sin_BTH = rope_tables(positions_BT, cfg.heads_dim, cfg.rope_theta)
        if cache is not None:
            if cfg.scan_layers:
                raise ValueError("decoding needs unrolled layers: use unstack_layers(params) and scan_layers=False")
            new_cache = []
            for i in range(cfg.num_layers):
                x_BTD, layer_cache = Block(cfg, name=f"layer_{i}")(x_BTD, cos_BTH, sin_BTH, positions_BT, cache[i],
                                                                   prefill)
                new_cache.append(layer_cache)
            cache = tuple(new_cache)
        elif cfg.scan_layers:
            layers = nn.scan(ScannedBlock, variable_axes={"params": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            if pipelined:
                layer_params = self.variables["params"]["layers"]["block"]
                x_BTD = gpipe(cfg, layer_params, x_BTD, self.stages, self.microbatches, self.repeats)
            else:
                x_BTD, _ = layers(cfg, name="layers")(x_BTD, cos_BTH, sin_BTH)
        else:
            block = block_class(cfg)
            for i in range(cfg.num_layers):
                x_BTD = block(cfg, name=f"layer_{i}")(x_BTD, cos_BTH, sin_BTH)
        x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            logits_BTV = dense(x_BTD, embedding_VD.T)
        else:
            logits_BTV = linear(self, "lm_head", x_BTD, (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)


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
    stage_axes = ("act_stage", *ACT_BTD)

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
    run_stages = jax.vmap(run_one_stage, spmd_axis_name="stage")
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
    from jax.sharding import PartitionSpec

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


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Scanned params ({"layers": {"block": [L, ...]}}) -> unrolled ({"layer_i": ...}); else as is."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"]["block"])
    return out


def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array,
                  weights_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed token cross-entropy in f32 and the number of weighted tokens.

    Vocabulary-parallel: with the vocab axis of the logits sharded over `tensor`, both the
    log-sum-exp and the target logit (a masked sum, not a gather) are per-shard reductions
    followed by an all-reduce of [B, T] values; the full [B, T, V] never lands on one device.
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    logz_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    vocab_V = jnp.arange(logits_BTV.shape[-1], dtype=targets_BT.dtype)
    target_logit_BT = jnp.sum(jnp.where(vocab_V == targets_BT[..., None], logits_BTV, 0.0), axis=-1)
    nll_BT = logz_BT - target_logit_BT
    if weights_BT is None:
        weights_BT = jnp.ones_like(nll_BT)
    return jnp.sum(nll_BT * weights_BT), jnp.sum(weights_BT)

