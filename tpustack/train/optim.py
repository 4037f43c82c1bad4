"""AdamW with linear warmup + cosine decay, global-norm clipping, no weight decay on norms."""

from __future__ import annotations

import jax
import optax

from tpustack.config import TrainConfig


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * cfg.min_lr_ratio at cfg.steps."""
    warmup = max(cfg.warmup_steps, 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / warmup, peak_value=cfg.lr, warmup_steps=warmup,
        decay_steps=max(cfg.steps, warmup + 1), end_value=cfg.lr * cfg.min_lr_ratio)


def decay_mask(params):
    """True for weights that decay: everything except norm scales (and any 1-D vector)."""
    def keep(path, leaf) -> bool:
        names = [getattr(k, "key", getattr(k, "name", "")) for k in path]
        return not any("norm" in str(n) for n in names) and leaf.ndim >= 2
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*chain)
