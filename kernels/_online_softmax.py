"""The online-softmax step both TPU attention kernels take per key block (flash, decode)."""

import jax.numpy as jnp


def online_softmax_step(s, mask, m_sc, l_sc, mask_value: float):
    """Fold a block of scores into the running max (m_sc) and denominator (l_sc) scratch.

    Returns (p, alpha): the block's unnormalised probabilities and the factor that rescales
    the accumulator, so the caller does acc = alpha * acc + p @ v.
    """
    s = jnp.where(mask, s, mask_value)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + p.sum(axis=1, keepdims=True)
    m_sc[...] = m_new
    return p, alpha

