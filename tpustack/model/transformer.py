"""The decoder: embedding -> L x (norm, attention, norm, SwiGLU) -> norm -> LM head.

Scan over layers (`model.scan_layers`) stacks layer weights on a leading `layers` axis and
compiles one block; remat (`model.remat_policy`) names a jax.checkpoint_policies entry or a
named policy of tpustack.remat.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util
from flax.core import unfreeze

from tpustack.config import ModelConfig
from tpustack.model.layers import PACKED_COLLECTION, MLP, Attention, RMSNorm, dense, linear, param, rope_tables
from tpustack.remat import checkpoint_policy

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
    return nn.remat(Block, policy=checkpoint_policy(cfg.remat_policy), prevent_cse=not cfg.scan_layers)


class Decoder(nn.Module):
    """tokens [B, T] (and optional positions [B, T]) -> logits [B, T, V].

    With `cache` (a tuple of per-layer LayerCaches, see tpustack.infer.cache) it returns
    (logits, new cache): keys/values are written at `positions_BT`. `prefill=True` says the
    tokens are whole prompts from position 0, so attention needs only their own keys. `select_BS`
    (indices into T) returns logits [B, S, V] at those positions only. Decoding runs the
    layers unrolled (see `unstack_layers`): per-layer caches stay separate buffers that
    update in place, where slicing a stacked cache inside a loop would copy it.
    """

    cfg: ModelConfig
    # (cfg, stacked layer params, x_BTD) -> x_BTD run in place of the scan over layers: the
    # training side's pipeline schedule (tpustack.train.pipeline). Needs scan_layers.
    pipeline: Callable | None = None

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None, cache=None,
                 prefill: bool = False, select_BS: jax.Array | None = None):
        cfg = self.cfg
        if cache is None and cfg.decode_kernels != "xla":  # model.decode_kernels is for decoding with a cache
            cfg = dataclasses.replace(cfg, decode_kernels="xla")
        pipelined = self.pipeline is not None and cache is None and not self.is_initializing()
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
            layers = nn.scan(ScannedBlock, variable_axes={"params": 0, "fp8": 0}, split_rngs={"params": True},
                             in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                             metadata_params={nn.PARTITION_NAME: "layers"})
            if pipelined:
                layer_params = self.variables["params"]["layers"]["block"]
                x_BTD = self.pipeline(cfg, layer_params, x_BTD)
            else:
                x_BTD, _ = layers(cfg, name="layers")(x_BTD, cos_BTH, sin_BTH)
        else:
            block = block_class(cfg)
            for i in range(cfg.num_layers):
                x_BTD = block(cfg, name=f"layer_{i}")(x_BTD, cos_BTH, sin_BTH)
        if select_BS is not None:  # logits only at these positions (the serving engine's last tokens)
            x_BTD = jnp.take_along_axis(x_BTD, select_BS[..., None], axis=1)
        x_BTD = RMSNorm(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            # XLA: it folds the transpose into its dot; a custom call would get a copy of the
            # whole [D, V] table every step
            logits_BTV = dense(x_BTD, embedding_VD.T)
        else:
            logits_BTV = linear(self, "lm_head", x_BTD, (cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), cfg)
        logits_BTV = nn.with_logical_constraint(logits_BTV, ("batch", "length", "act_vocab"))
        return logits_BTV if cache is None else (logits_BTV, cache)


@functools.lru_cache(maxsize=64)
def abstract_params(cfg: ModelConfig) -> dict:
    """The parameter tree, written once: ShapeDtypeStructs boxed with their logical axis
    names (flax `Partitioned`), from eval_shape of init, so nothing is allocated. Shardings,
    the memory estimate and every exporter derive names, shapes and axes from it."""
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    return jax.eval_shape(lambda t: Decoder(cfg).init(jax.random.key(0), t), tokens)["params"]


def loss_sums(model: Decoder, params, batch: dict) -> dict:
    """Summed next-token loss and token count of a batch {"inputs", "targets"} [B, T]."""
    total, count = cross_entropy(model.apply({"params": params}, batch["inputs"]), batch["targets"])
    return {"loss_sum": total, "tokens": count}


def unstack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Scanned params ({"layers": {"block": [L, ...]}}) -> unrolled ({"layer_i": ...}); else as is."""
    if "layers" not in params:
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(cfg.num_layers):
        out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"]["block"])
    return out


def stack_layers(params: dict, cfg: ModelConfig) -> dict:
    """Unrolled ({"layer_i": ...}) -> scanned ({"layers": {"block": [L, ...]}}); numpy stays numpy."""
    if "layers" in params:
        return params
    layers = [params[f"layer_{i}"] for i in range(cfg.num_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("layer_")}
    stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)  # noqa: E731
    out["layers"] = {"block": jax.tree.map(stack, *layers)}
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



def pack_for_cpu(cfg: ModelConfig, params: dict) -> dict:
    """Unrolled params -> the variables a decoding apply takes on CPU: every float dense weight
    packed once for the native matmul (tpustack.kernels.pack_weight) under PACKED_COLLECTION, and
    removed from "params" (it would only double the memory). One forward pass over a token,
    with the packed collection mutable, lets each linear pack its own weight in its own layout."""
    model = Decoder(dataclasses.replace(cfg, scan_layers=False, remat_policy="none"))
    tokens = jnp.zeros((1, 1), jnp.int32)
    _, packed = jax.jit(lambda p: model.apply({"params": p}, tokens, mutable=[PACKED_COLLECTION]))(params)
    packed = unfreeze(packed)[PACKED_COLLECTION]
    taken = set(traverse_util.flatten_dict(packed))
    rest = {k: v for k, v in traverse_util.flatten_dict(params).items() if k not in taken}
    return {"params": traverse_util.unflatten_dict(rest), PACKED_COLLECTION: packed}
