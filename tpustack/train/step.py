"""Train state, its sharded initialisation, and the one pure `train_step(state, batch)`.

Initialisation is abstract first: eval_shape gives the state's shapes and logical axis
names, the rules table turns them into shardings, and jit(init, out_shardings=...)
creates every array directly in its shard; a full-size model never sits on one device.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpustack.config import Config, ModelConfig
from tpustack.mesh import (batch_sharding, check_divisible, mesh_context, param_shardings, rules_for,
                           zero_shardings)
from tpustack.model import Decoder, cross_entropy
from tpustack.train.distill import distillation_loss
from tpustack.train.optim import learning_rate_schedule, make_optimizer
from tpustack.train.precision import LossScale, all_finite, apply_precision


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale


@dataclasses.dataclass
class Trainer:
    """The jitted functions and shardings of one (config, mesh); built by `make_trainer`."""

    config: Config
    mesh: Mesh
    model: Decoder
    tx: optax.GradientTransformation
    state_shardings: Any
    batch_sharding: NamedSharding
    init: Callable[[jax.Array], TrainState]
    train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
    eval_step: Callable[[Any, dict], dict]
    loss_and_grads: Callable[[Any, dict], tuple[jax.Array, Any]]
    abstract_state: Any
    lower_train_step: Callable[[int, int], Any]  # (batch, seq_len) -> jax Lowered, for AOT compiles


def _microbatches(batch: dict, accum: int) -> dict:
    """[B, T] -> [A, B/A, T] taking rows a, A + a, ... so each device's rows stay local."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def make_trainer(config: Config, mesh: Mesh, teacher: tuple[ModelConfig, Any] | None = None) -> Trainer:
    """Build the model, optimizer, shardings and jitted init / train / eval functions.

    With a `teacher` (its model config and params) the loss is config.distill's
    distillation loss against the teacher's logits instead of plain cross-entropy.
    """
    rules = rules_for(config.mesh.rules)
    model_cfg = apply_precision(config.model, config.train)
    model = Decoder(model_cfg, stages=mesh.shape.get("stage", 1), microbatches=config.parallel.microbatches,
                    repeats=config.parallel.pipeline_repeats)
    tx = make_optimizer(config.train)
    schedule = learning_rate_schedule(config.train)
    t = config.train

    def init_boxed(rng: jax.Array) -> TrainState:
        tokens = jnp.zeros((1, 8), jnp.int32)
        params = model.init(rng, tokens)["params"]
        return TrainState(step=jnp.asarray(0, jnp.int32), params=params,
                          opt_state=tx.init(params), loss_scale=LossScale.create(t))

    # An abstract key: a concrete one would need a real device, and ahead-of-time compiles
    # for virtual TPU topologies have none.
    abstract_key = jax.eval_shape(lambda: jax.random.key(0))
    with mesh_context(mesh, rules):
        boxed = jax.eval_shape(init_boxed, abstract_key)
        specs = nn.get_partition_spec(boxed)
        full_shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)  # everything over fsdp: ZeRO-3
    abstract_state = nn.meta.unbox(boxed)
    check_divisible(abstract_state, jax.tree.map(lambda s: s.spec, full_shardings), mesh)
    # ZeRO stage: what `fsdp` shards. The rest is whole on every fsdp device.
    zero = config.parallel.zero_stage
    state_shardings = full_shardings.replace(params=zero_shardings(full_shardings.params, zero >= 3),
                                             opt_state=zero_shardings(full_shardings.opt_state, zero >= 1))
    grad_shardings = zero_shardings(full_shardings.params, zero >= 2)  # 2+: reduce-scatter, else all-reduce
    data_sharding = batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def init(rng: jax.Array) -> TrainState:
        with mesh_context(mesh, rules):
            return jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=state_shardings)(rng)

    teacher_model = Decoder(apply_precision(teacher[0], t)) if teacher is not None else None
    teacher_shardings = param_shardings(teacher[0], mesh, rules) if teacher is not None else None
    teacher_params = jax.device_put(teacher[1], teacher_shardings) if teacher is not None else None

    def loss_fn(params, batch, scale, num_tokens, teacher_params=None):
        logits_BTV = model.apply({"params": params}, batch["inputs"])
        if teacher_model is None:
            total, _ = cross_entropy(logits_BTV, batch["targets"])
            loss = total / num_tokens
        else:
            teacher_BTV = teacher_model.apply({"params": teacher_params}, batch["inputs"])
            mean, _ = distillation_loss(logits_BTV, teacher_BTV, batch["targets"], config.distill.alpha,
                                        config.distill.temperature)
            loss = mean * (batch["targets"].size / num_tokens)
        return loss * scale, loss

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state: TrainState, batch: dict, teacher_params=None) -> tuple[TrainState, dict]:
        num_tokens = batch["targets"].size
        scale = state.loss_scale.scale
        if t.grad_accum == 1:
            (_, loss), grads = grad_fn(state.params, batch, scale, num_tokens, teacher_params)
        else:
            def body(carry, mb):
                g_acc, l_acc = carry
                (_, l), g = grad_fn(state.params, mb, scale, num_tokens, teacher_params)
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + l), None
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (grads, loss), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                            _microbatches(batch, t.grad_accum))
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
        grads = jax.tree.map(lambda g: g / scale, grads)
        finite = all_finite(grads)

        def apply(params, opt_state):
            updates, new_opt = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), new_opt

        # A step with non-finite gradients (fp16 overflow) changes nothing but the scale.
        # lax.cond rather than a per-leaf jnp.where(finite, new, old): the select kept the
        # old params and moments alive next to the new ones, so XLA copied every donated
        # Adam moment first (the update took ~1.9x as long on CPU).
        new_params, new_opt = jax.lax.cond(finite, apply, lambda p, o: (p, o), state.params, state.opt_state)
        new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt,
                               loss_scale=state.loss_scale.update(finite))
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step),
                   "loss_scale": scale, "grads_finite": finite}
        return new_state, metrics

    def eval_step(params, batch: dict) -> dict:
        logits_BTV = model.apply({"params": params}, batch["inputs"])
        total, count = cross_entropy(logits_BTV, batch["targets"])
        return {"loss_sum": total, "tokens": count}

    def traced(fn):
        def wrapped(*args):
            with mesh_context(mesh, rules):
                return fn(*args)
        return wrapped

    jit_train = jax.jit(train_step, in_shardings=(state_shardings, data_sharding, teacher_shardings),
                        out_shardings=(state_shardings, replicated), donate_argnums=0)
    run_train = traced(jit_train)
    def loss_and_grads(params, batch: dict):
        (_, loss), grads = grad_fn(params, batch, jnp.float32(1.0), batch["targets"].size)
        return loss, grads

    jit_grads = jax.jit(loss_and_grads, in_shardings=(state_shardings.params, data_sharding),
                        out_shardings=(replicated, state_shardings.params))
    jit_eval = jax.jit(eval_step, in_shardings=(state_shardings.params, data_sharding),
                       out_shardings=replicated)
    def lower_train_step(batch_size: int, seq_len: int):
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             abstract_state, state_shardings)
        tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=data_sharding)
        with mesh_context(mesh, rules):
            return jit_train.lower(state, {"inputs": tokens, "targets": tokens}, teacher_params)

    return Trainer(config=config, mesh=mesh, model=model, tx=tx, state_shardings=state_shardings,
                   batch_sharding=data_sharding, init=init,
                   train_step=lambda state, batch: run_train(state, batch, teacher_params),
                   eval_step=traced(jit_eval), loss_and_grads=traced(jit_grads),
                   abstract_state=abstract_state, lower_train_step=lower_train_step)


def global_batch(host_batch: dict, sharding: NamedSharding, global_rows: int) -> dict:
    """Assemble the global jax.Array from this host's rows (each host passes only its slice)."""
    def make(x):
        shape = (global_rows, *x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, shape)
    return {k: make(v) for k, v in host_batch.items()}
