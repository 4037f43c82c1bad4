"""Mixed precision: dynamic loss scaling for fp16 (the compute dtype is settled in config.to_config).

fp16 gradients underflow, so the loss is multiplied by a scale S before backprop and the
gradients divided by S after. A step whose gradients are not finite is skipped and S is
halved; after `growth_interval` clean steps in a row S doubles (chapter 30.3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from tpustack.config import TrainConfig


@struct.dataclass
class LossScale:
    scale: jax.Array  # f32 scalar
    clean_steps: jax.Array  # i32 scalar: finite steps since the last change
    growth_interval: int = struct.field(pytree_node=False, default=2000)
    active: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def create(cls, train: TrainConfig) -> "LossScale":
        active = train.precision == "fp16"
        return cls(scale=jnp.asarray(train.loss_scale_init if active else 1.0, jnp.float32),
                   clean_steps=jnp.asarray(0, jnp.int32),
                   growth_interval=train.loss_scale_growth_interval, active=active)

    def update(self, grads_finite: jax.Array) -> "LossScale":
        if not self.active:
            return self
        grow = grads_finite & (self.clean_steps + 1 >= self.growth_interval)
        scale = jnp.where(grads_finite, jnp.where(grow, self.scale * 2.0, self.scale),
                          jnp.maximum(self.scale * 0.5, 1.0))
        clean = jnp.where(grads_finite & ~grow, self.clean_steps + 1, 0)
        return self.replace(scale=scale, clean_steps=clean.astype(jnp.int32))


def all_finite(tree) -> jax.Array:
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))
