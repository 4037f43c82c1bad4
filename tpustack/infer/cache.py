"""The KV cache: per layer, preallocated [B, S, K, H] keys and values (bf16/f32 or int8).

GQA-aware: it holds K kv heads, not N query heads. int8 stores one f32 scale per
(token, kv head) for keys and for values (symmetric absmax over the head dim), so a
token's cost is 2 * K * (H + 4) bytes instead of 2 * K * H * itemsize. Writes go to
explicit per-row positions, so rows of one batch may sit at different lengths.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from tpustack.config import ModelConfig
from tpustack.plan.memory import kv_cache_bytes

CACHE_DTYPES = ("float32", "bfloat16", "float16", "int8")


@struct.dataclass
class LayerCache:
    k_BSKH: jax.Array
    v_BSKH: jax.Array
    k_scale_BSK: jax.Array | None = None  # int8 only
    v_scale_BSK: jax.Array | None = None

    @property
    def quantized(self) -> bool:
        return self.k_scale_BSK is not None

    def write(self, k_BTKH: jax.Array, v_BTKH: jax.Array, positions_BT: jax.Array) -> "LayerCache":
        """Store new keys/values at each row's positions (scatter: rows may differ)."""
        rows_BT = jnp.broadcast_to(jnp.arange(k_BTKH.shape[0])[:, None], positions_BT.shape)
        if not self.quantized:
            dtype = self.k_BSKH.dtype
            return self.replace(k_BSKH=self.k_BSKH.at[rows_BT, positions_BT].set(k_BTKH.astype(dtype)),
                                v_BSKH=self.v_BSKH.at[rows_BT, positions_BT].set(v_BTKH.astype(dtype)))
        kq, ks = quantize_int8(k_BTKH)
        vq, vs = quantize_int8(v_BTKH)
        return self.replace(k_BSKH=self.k_BSKH.at[rows_BT, positions_BT].set(kq),
                            v_BSKH=self.v_BSKH.at[rows_BT, positions_BT].set(vq),
                            k_scale_BSK=self.k_scale_BSK.at[rows_BT, positions_BT].set(ks),
                            v_scale_BSK=self.v_scale_BSK.at[rows_BT, positions_BT].set(vs))

    def read(self, dtype) -> tuple[jax.Array, jax.Array]:
        """Keys and values in the compute dtype (dequantized for int8)."""
        if not self.quantized:
            return self.k_BSKH.astype(dtype), self.v_BSKH.astype(dtype)
        k = self.k_BSKH.astype(jnp.float32) * self.k_scale_BSK[..., None]
        v = self.v_BSKH.astype(jnp.float32) * self.v_scale_BSK[..., None]
        return k.astype(dtype), v.astype(dtype)


def quantize_int8(x_BTKH: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric per-(token, head) int8: x ~= q * scale with |q| <= 127."""
    x = x_BTKH.astype(jnp.float32)
    scale_BTK = jnp.max(jnp.abs(x), axis=-1) / 127.0
    q = jnp.round(x / jnp.where(scale_BTK == 0, 1.0, scale_BTK)[..., None])
    return jnp.clip(q, -127, 127).astype(jnp.int8), scale_BTK


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32") -> tuple[LayerCache, ...]:
    """Zeroed caches for every layer."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {CACHE_DTYPES}")
    shape = (batch, max_len, cfg.num_kv_heads, cfg.heads_dim)

    def layer() -> LayerCache:
        if dtype == "int8":
            return LayerCache(jnp.zeros(shape, jnp.int8), jnp.zeros(shape, jnp.int8),
                              jnp.zeros(shape[:3], jnp.float32), jnp.zeros(shape[:3], jnp.float32))
        return LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    return tuple(layer() for _ in range(cfg.num_layers))


def cache_bytes(cfg: ModelConfig, batch: int, max_len: int, dtype: str = "float32") -> int:
    """The chapter's 2 * L * layers * (kv_heads * head_dim) * batch * bytes, plus int8 scales."""
    return int(kv_cache_bytes(cfg, max_len, batch, dtype))
