"""A plain sampler: one jitted loop that re-runs the decoder over a fixed token buffer.

No KV cache: every step is a full forward pass over the buffer (causal, so padding past a
row's position never affects it). Good enough to read samples from small models; the
cache-aware decode loop replaces it for serving.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.errors import UserError
from tpustack.model import Decoder


@partial(jax.jit, static_argnames=("model", "max_new_tokens", "top_k"))
def _sample_loop(model: Decoder, params, buffer_BL, lengths_B, rng, max_new_tokens: int,
                 temperature, top_k: int):
    rows = jnp.arange(buffer_BL.shape[0])

    def body(i, carry):
        buffer_BL, rng = carry
        logits_BLV = model.apply({"params": params}, buffer_BL)
        pos_B = lengths_B + i
        logits_BV = logits_BLV[rows, pos_B - 1].astype(jnp.float32)
        if top_k > 0:
            kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
            logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
        rng, key = jax.random.split(rng)
        sampled_B = jax.random.categorical(key, logits_BV / jnp.maximum(temperature, 1e-6))
        next_B = jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BV, axis=-1))
        return buffer_BL.at[rows, pos_B].set(next_B.astype(buffer_BL.dtype)), rng

    buffer_BL, _ = jax.lax.fori_loop(0, max_new_tokens, body, (buffer_BL, rng))
    return buffer_BL


def sample(model: Decoder, params, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.8,
           top_k: int = 0, seed: int = 0, eos_id: int | None = None) -> list[list[int]]:
    """Continue each prompt by max_new_tokens tokens; returns the new tokens, cut at EOS."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise UserError("--prompt: every prompt needs at least one token")
    limit = model.cfg.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > limit:
        raise UserError(f"--max-new-tokens: prompt ({longest}) + {max_new_tokens} new tokens exceeds the "
                        f"model's max_seq_len={limit}; ask for at most {limit - longest}")
    length = min(limit, 1 << (longest + max_new_tokens - 1).bit_length())  # a few buckets, few compiles
    buffer = np.zeros((len(prompts), length), np.int32)
    for row, p in enumerate(prompts):
        buffer[row, :len(p)] = p
    lengths = np.asarray([len(p) for p in prompts], np.int32)
    out = _sample_loop(model, params, jnp.asarray(buffer), jnp.asarray(lengths), jax.random.key(seed),
                       max_new_tokens, jnp.float32(temperature), top_k)
    out = np.asarray(out)
    results = []
    for row, p in enumerate(prompts):
        new = out[row, len(p):len(p) + max_new_tokens].tolist()
        if eos_id is not None and eos_id in new:
            new = new[:new.index(eos_id)]
        results.append(new)
    return results
