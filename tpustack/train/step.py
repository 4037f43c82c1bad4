"""Train state, its sharded initialisation, and the one pure `train_step(config, state, batch)`.

Every function here is top level and pure in its arrays: `init_state`, `train_step`,
`eval_step` and `loss_and_grads` take the (hashable, frozen) Config first and trace under
whatever mesh is current. `state_shardings` says where each piece of the state lives for
a (config, mesh), by the rules table and the ZeRO stage. `Trainer` is only the plumbing
that jits them with explicit in/out shardings and donation for one mesh.

Initialisation is abstract first: eval_shape gives the state's shapes and logical axis
names, the rules table turns them into shardings, and jit(init, out_shardings=...)
creates every array directly in its shard; a full-size model never sits on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tpustack.config import Config, ModelConfig
from tpustack.mesh import global_batch  # noqa: F401 - re-exported: scripts build batches beside the Trainer
from tpustack.mesh import (batch_sharding, check_divisible, mesh_context, param_shardings, rules_for,
                           zero_shardings, zero_specs)
from tpustack.model import Decoder, abstract_params, cross_entropy, loss_sums
from tpustack.model.fp8 import COLLECTION as FP8_COLLECTION
from tpustack.model.fp8 import init_fp8_state
from tpustack.train.distill import distillation_loss
from tpustack.train.optim import learning_rate_schedule, make_optimizer
from tpustack.train.pipeline import Pipeline
from tpustack.train.precision import LossScale, all_finite


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    loss_scale: LossScale


@struct.dataclass
class Fp8TrainState(TrainState):
    """train.precision=fp8: also the amax histories of every linear (tpustack.model.fp8)."""

    fp8: Any = None


@struct.dataclass
class Teacher:
    """A frozen distillation teacher: its config is static, its params a jit argument."""

    cfg: ModelConfig = struct.field(pytree_node=False)
    params: Any = None


def decoder(config: Config, stages: int = 1) -> Decoder:
    """The training model; with stages > 1 the layers run as config.parallel's pipeline."""
    p = config.parallel
    pipeline = Pipeline(stages, p.microbatches, p.pipeline_repeats) if stages > 1 else None
    return Decoder(config.model, pipeline=pipeline)


def _mesh_stages() -> int:
    """Pipeline stages of the mesh being traced under (1 off a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    return 1 if mesh.empty else dict(mesh.shape).get("stage", 1)


def _boxed_state(config: Config, rng: jax.Array) -> TrainState:
    """The state with params and Adam moments still boxed with their logical axis names."""
    params = Decoder(config.model).init(rng, jnp.zeros((1, 8), jnp.int32))["params"]
    fields = dict(step=jnp.asarray(0, jnp.int32), params=params,
                  opt_state=make_optimizer(config.train).init(params), loss_scale=LossScale.create(config.train))
    if config.train.precision == "fp8":
        return Fp8TrainState(**fields, fp8=init_fp8_state(params))
    return TrainState(**fields)


def init_state(config: Config, rng: jax.Array) -> TrainState:
    """A fresh train state (unsharded unless jitted with `state_shardings` as out_shardings)."""
    return nn.meta.unbox(_boxed_state(config, rng))


@functools.lru_cache(maxsize=32)
def _abstract_boxed_state(config: Config) -> TrainState:
    # An abstract key: a concrete one would need a real device, and ahead-of-time compiles
    # for virtual TPU topologies have none.
    return jax.eval_shape(lambda k: _boxed_state(config, k), jax.eval_shape(lambda: jax.random.key(0)))


def abstract_state(config: Config) -> TrainState:
    """ShapeDtypeStructs of the train state."""
    return nn.meta.unbox(_abstract_boxed_state(config))


def state_shardings(config: Config, mesh: Mesh) -> TrainState:
    """NamedShardings of the train state on `mesh`: the rules table, then the ZeRO stage.

    The rules shard every weight's `embed` dim over fsdp (ZeRO-3); lower stages keep the
    params (0-2) and the Adam moments (0) whole on every fsdp device."""
    rules = rules_for(config.mesh.rules)
    specs = nn.get_partition_spec(_abstract_boxed_state(config))
    full = nn.logical_to_mesh_sharding(specs, mesh, rules)
    check_divisible(abstract_state(config), jax.tree.map(lambda s: s.spec, full), mesh)
    zero = config.parallel.zero_stage
    return full.replace(params=zero_shardings(full.params, zero >= 3),
                        opt_state=zero_shardings(full.opt_state, zero >= 1))


def grad_specs(config: Config) -> Any:
    """PartitionSpecs of the gradients: ZeRO 2+ reduce-scatters them over fsdp, 0-1 all-reduce."""
    logical = nn.get_partition_spec(abstract_params(config.model))
    return zero_specs(nn.logical_to_mesh(logical, rules_for(config.mesh.rules)), config.parallel.zero_stage >= 2)


def loss_fn(config: Config, params: Any, batch: dict, scale: jax.Array, num_tokens: int,
            teacher: Teacher | None = None, fp8: Any = None) -> tuple[jax.Array, jax.Array]:
    """(scaled loss, loss) of a (micro)batch: cross-entropy, or config.distill's loss with a teacher.
    With `fp8` (amax histories) the linears run fp8 matmuls."""
    variables = {"params": params} if fp8 is None else {"params": params, FP8_COLLECTION: fp8}
    logits_BTV = decoder(config, _mesh_stages()).apply(variables, batch["inputs"])
    if teacher is None:
        total, _ = cross_entropy(logits_BTV, batch["targets"])
        loss = total / num_tokens
    else:
        teacher_BTV = Decoder(teacher.cfg).apply({"params": teacher.params}, batch["inputs"])
        mean, _ = distillation_loss(logits_BTV, teacher_BTV, batch["targets"], config.distill.alpha,
                                    config.distill.temperature)
        loss = mean * (batch["targets"].size / num_tokens)
    return loss * scale, loss


def _microbatches(batch: dict, accum: int) -> dict:
    """[B, T] -> [A, B/A, T] taking rows a, A + a, ... so each device's rows stay local."""
    def split(x):
        b = x.shape[0]
        return jnp.swapaxes(x.reshape(b // accum, accum, *x.shape[1:]), 0, 1)
    return jax.tree.map(split, batch)


def accumulated_grads(config: Config, params: Any, batch: dict, scale: jax.Array, teacher: Teacher | None = None,
                      fp8: Any = None) -> tuple[jax.Array, Any, Any]:
    """(mean loss, scaled gradients, next fp8 amax histories or None) over config.train.grad_accum
    microbatches. The histories come back as the "gradient" of the fp8 state (model/fp8.py);
    over microbatches their max is the history with the step's largest amax in front."""
    grad_fn = jax.value_and_grad(lambda pf, *a: loss_fn(config, pf[0], *a, fp8=pf[1]), has_aux=True)
    num_tokens, accum = batch["targets"].size, config.train.grad_accum
    if accum == 1:
        (_, loss), (grads, new_fp8) = grad_fn((params, fp8), batch, scale, num_tokens, teacher)
        return loss, grads, new_fp8

    def body(carry, mb):
        g_acc, l_acc, h_acc = carry
        (_, loss_mb), (g, h) = grad_fn((params, fp8), mb, scale, num_tokens, teacher)
        return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss_mb, jax.tree.map(jnp.maximum, h_acc, h)), None
    zeros = jax.tree.map(jnp.zeros_like, params)
    no_amax = jax.tree.map(jnp.zeros_like, fp8)  # histories are >= 0: max with these keeps the new one
    (grads, loss, new_fp8), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32), no_amax),
                                             _microbatches(batch, accum))
    return loss, grads, new_fp8


def train_step(config: Config, state: TrainState, batch: dict,
               teacher: Teacher | None = None) -> tuple[TrainState, dict]:
    """One optimizer step: gradients (accumulated, loss-scaled), AdamW, the loss-scale update."""
    scale = state.loss_scale.scale
    fp8 = state.fp8 if isinstance(state, Fp8TrainState) else None
    loss, grads, new_fp8 = accumulated_grads(config, state.params, batch, scale, teacher, fp8)
    grads = jax.lax.with_sharding_constraint(grads, grad_specs(config))
    grads = jax.tree.map(lambda g: g / scale, grads)
    finite = all_finite(grads)
    tx = make_optimizer(config.train)

    def apply(params, opt_state):
        updates, new_opt = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_opt

    # A step with non-finite gradients (fp16 overflow) changes nothing but the scale.
    # lax.cond rather than a per-leaf jnp.where(finite, new, old): the select kept the
    # old params and moments alive next to the new ones, so XLA copied every donated
    # Adam moment first (the update took ~1.9x as long on CPU).
    new_params, new_opt = jax.lax.cond(finite, apply, lambda p, o: (p, o), state.params, state.opt_state)
    new_state = state.replace(step=state.step + 1, params=new_params, opt_state=new_opt,
                              loss_scale=state.loss_scale.update(finite))
    if fp8 is not None:
        new_state = new_state.replace(fp8=new_fp8)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": learning_rate_schedule(config.train)(state.step), "loss_scale": scale, "grads_finite": finite}
    return new_state, metrics


def eval_step(config: Config, params: Any, batch: dict) -> dict:
    """Summed held-out loss and token count of a batch."""
    return loss_sums(decoder(config, _mesh_stages()), params, batch)


def loss_and_grads(config: Config, params: Any, batch: dict) -> tuple[jax.Array, Any]:
    """Unscaled loss and gradients (tests compare them across mesh layouts)."""
    (_, loss), grads = jax.value_and_grad(functools.partial(loss_fn, config), has_aux=True)(
        params, batch, jnp.float32(1.0), batch["targets"].size)
    return loss, grads


@dataclasses.dataclass
class Trainer:
    """The pure steps above, jitted for one (config, mesh) with explicit shardings."""

    config: Config
    mesh: Mesh
    teacher: Teacher | None = None  # distillation: the loss is config.distill's against its logits

    def __post_init__(self):
        c, mesh = self.config, self.mesh
        self.rules = rules_for(c.mesh.rules)
        self.abstract_state = abstract_state(c)
        self.state_shardings = state_shardings(c, mesh)
        self.batch_sharding = batch_sharding(mesh, self.rules)
        replicated = NamedSharding(mesh, PartitionSpec())
        params_s = self.state_shardings.params
        teacher_s = None
        if self.teacher is not None:
            teacher_s = Teacher(self.teacher.cfg, param_shardings(self.teacher.cfg, mesh, self.rules))
            self.teacher = jax.device_put(self.teacher, teacher_s)
        self._init = jax.jit(functools.partial(init_state, c), out_shardings=self.state_shardings)
        self._train = jax.jit(functools.partial(train_step, c), donate_argnums=0,
                              in_shardings=(self.state_shardings, self.batch_sharding, teacher_s),
                              out_shardings=(self.state_shardings, replicated))
        self._eval = jax.jit(functools.partial(eval_step, c), in_shardings=(params_s, self.batch_sharding),
                             out_shardings=replicated)
        self._grads = jax.jit(functools.partial(loss_and_grads, c), in_shardings=(params_s, self.batch_sharding),
                              out_shardings=(replicated, params_s))

    def _traced(self, fn, *args):
        with mesh_context(self.mesh, self.rules):
            return fn(*args)

    def init(self, rng: jax.Array) -> TrainState:
        return self._traced(self._init, rng)

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        return self._traced(self._train, state, batch, self.teacher)

    def eval_step(self, params: Any, batch: dict) -> dict:
        return self._traced(self._eval, params, batch)

    def loss_and_grads(self, params: Any, batch: dict) -> tuple[jax.Array, Any]:
        return self._traced(self._grads, params, batch)

    def lower_train_step(self, batch_size: int, seq_len: int):
        """The jax Lowered train step for abstract inputs, for ahead-of-time compiles."""
        state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                             self.abstract_state, self.state_shardings)
        tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=self.batch_sharding)
        return self._traced(self._train.lower, state, {"inputs": tokens, "targets": tokens}, self.teacher)


def make_trainer(config: Config, mesh: Mesh, teacher: tuple[ModelConfig, Any] | None = None) -> Trainer:
    """A Trainer; `teacher` is a distillation teacher's (model config, params)."""
    return Trainer(config, mesh, Teacher(*teacher) if teacher is not None else None)
