"""Knowledge distillation (chapter 30.4c): L = a * CE(y, p_s) + (1 - a) * T^2 * KL(p_t^T || p_s^T).

p^T is a softmax at temperature T; the T^2 keeps the soft-target gradients the size of the
hard-label ones. The teacher is frozen: its logits carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def distillation_loss(student_logits_BTV: jax.Array, teacher_logits_BTV: jax.Array, targets_BT: jax.Array,
                      alpha: float, temperature: float) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean per-token loss and its two parts."""
    s = student_logits_BTV.astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits_BTV.astype(jnp.float32))
    log_p_s = jax.nn.log_softmax(s, axis=-1)
    ce = -jnp.mean(jnp.take_along_axis(log_p_s, targets_BT[..., None], axis=-1))
    log_p_t_T = jax.nn.log_softmax(t / temperature, axis=-1)
    log_p_s_T = jax.nn.log_softmax(s / temperature, axis=-1)
    kl = jnp.mean(jnp.sum(jnp.exp(log_p_t_T) * (log_p_t_T - log_p_s_T), axis=-1))
    loss = alpha * ce + (1.0 - alpha) * temperature**2 * kl
    return loss, {"ce": ce, "kl": kl}
