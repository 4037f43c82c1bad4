"""What `tpustack prune` does around the pruners: the source's config, a short fine-tune to
recover (the training step of tpustack.train, the pruning masks held after every step), the
held-out loss, and the pruned model written as a workdir that load_weights reads.

The output is WORKDIR/checkpoints/<step>/{state: {"params"}, meta: config}: a params-only
workdir (no optimizer state) whose config is the pruned model's, with unrolled layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.checkpoint import Checkpointer
from tpustack.compress.prune import apply_masks
from tpustack.config import CheckpointConfig, Config, MeshConfig, ModelConfig
from tpustack.data import Batcher, load_tokenizer, load_tokens
from tpustack.evaluate import mean_loss
from tpustack.mesh import batch_sharding, global_batch, make_mesh, rules_for
from tpustack.model import Decoder, loss_sums
from tpustack.train.optim import make_optimizer
from tpustack.train.precision import LossScale
from tpustack.train.step import Trainer, TrainState


def with_model(config: Config, cfg: ModelConfig, name_suffix: str) -> Config:
    """config describing `cfg` (unrolled layers, no remat: the layout the params are in)."""
    cfg = dataclasses.replace(cfg, scan_layers=False, remat_policy="none")
    return dataclasses.replace(config, model=cfg, name=config.name + name_suffix)


def save_workdir(out: str, config: Config, params: Any, step: int = 0) -> None:
    """Write params (and config) as a params-only tpustack workdir at `out`."""
    ckpt = Checkpointer(out, CheckpointConfig(every=0, keep=1, async_save=False))
    try:
        state = {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}
        ckpt.save(step, state, config, force=True)
    finally:
        ckpt.close()


def _one_device_mesh(config: Config):
    return make_mesh(MeshConfig(rules=config.mesh.rules), jax.devices()[:1])


def heldout_loss(config: Config, params: Any, num_batches: int | None = None) -> float:
    """Mean held-out loss per token of `params` (config.model) on config's data and batch shape:
    the windows the training loop's eval reads."""
    t = config.train
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))["heldout"]
    batches = Batcher(tokens, t.batch_size, t.seq_len, t.seed, "heldout")
    mesh = _one_device_mesh(config)
    step = jax.jit(functools.partial(loss_sums, Decoder(config.model)))
    return mean_loss(step, params, batches, num_batches or t.eval_batches, batch_sharding(mesh, rules_for(
        config.mesh.rules)))


def recover(config: Config, params: Any, steps: int, lr: float, masks: dict | None = None,
            log_every: int = 0) -> tuple[Any, list[float]]:
    """(params, losses) after `steps` AdamW steps on the training split (warmup 10%, cosine),
    with the unstructured masks re-applied after each step so pruned weights stay zero."""
    t = dataclasses.replace(config.train, steps=steps, lr=lr, warmup_steps=max(1, steps // 10), grad_accum=1,
                            precision=config.train.precision)
    config = dataclasses.replace(config, train=t, mesh=MeshConfig(rules=config.mesh.rules))
    trainer = Trainer(config, _one_device_mesh(config))
    params = jax.tree.map(lambda a: jnp.array(a, jnp.float32), params)  # a copy: the step donates it
    state = TrainState(step=jnp.asarray(0, jnp.int32), params=params, opt_state=make_optimizer(t).init(params),
                       loss_scale=LossScale.create(t))
    state = jax.device_put(state, trainer.state_shardings)
    keep = {k: jnp.asarray(v) for k, v in (masks or {}).items()}
    remask = jax.jit(lambda s: s.replace(params=apply_masks(s.params, keep)), donate_argnums=0)
    tokens = load_tokens(config.data, load_tokenizer(config.data.tokenizer))["train"]
    batches = Batcher(tokens, t.batch_size, t.seq_len, t.seed + 1, "train")  # not the pretraining order
    losses = []
    for step in range(steps):
        batch = global_batch(batches.host_batch(step), trainer.batch_sharding, t.batch_size)
        state, metrics = trainer.train_step(state, batch)
        if keep:
            state = remask(state)
        losses.append(float(metrics["loss"]))
        if log_every and (step + 1) % log_every == 0:
            print(f"recover step {step + 1}/{steps}: loss {losses[-1]:.4f}", flush=True)
    return jax.device_get(state.params), losses


def as_numpy(params: Any) -> Any:
    """A host copy of params as float32 numpy arrays."""
    return jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(params))
