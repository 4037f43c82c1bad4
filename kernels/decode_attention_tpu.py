"""Decode attention for TPU (Pallas Mosaic): one query token per sequence over a KV cache.

q [B, N, H] is viewed as [B, K, G, H] so one grid step serves the G query heads of a
kv head against one (block, H) tile of the cache: K/V are read once per kv head. Cache
lengths and (paged) page tables are scalar-prefetched into SMEM; the kv block index is
clamped to the sequence's last block so steps past its length issue no DMA. int8
caches are converted in VMEM and their per-token scales (row vectors [1, block])
multiply the logits and the probabilities, never the cache.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import compat
from ._online_softmax import online_softmax_step
from .compat import MASK_VALUE, pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class DCfg:
    """Static parameters of one decode call."""
    sm_scale: float
    soft_cap: float | None
    block: int  # cache tokens per grid step (the page size when paged)
    quantized: bool
    interpret: bool


def _kernel(*refs, cfg: DCfg, paged: bool):
    n_pref = 2 if paged else 1
    len_ref = refs[0]
    refs = refs[n_pref:]
    if cfg.quantized:
        q_ref, k_ref, v_ref, ks_ref, vs_ref, o_ref, m_sc, l_sc, acc = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc), ks_ref, vs_ref = refs, None, None
    b, j = pl.program_id(0), pl.program_id(2)
    length = len_ref[b]
    bs = cfg.block

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc[...] = jnp.zeros(acc.shape, F32)

    @pl.when(j * bs < length)
    def _step():
        q = q_ref[...]
        k, v = k_ref[...], v_ref[...]
        if cfg.quantized:  # int8 -> compute dtype in VMEM only
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32)
        if cfg.quantized:
            s = s * ks_ref[...]
        s = s * cfg.sm_scale
        if cfg.soft_cap:
            s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
        mask = j * bs + lax.broadcasted_iota(jnp.int32, s.shape, 1) < length
        p, alpha = online_softmax_step(s, mask, m_sc, l_sc, MASK_VALUE)
        if cfg.quantized:
            p = p * vs_ref[...]
        acc[...] = alpha * acc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)

    @pl.when(j == pl.num_programs(2) - 1)
    def _done():
        l = l_sc[...]
        o_ref[...] = (acc[...] * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)).astype(o_ref.dtype)


def _run(q, k, v, scales, prefetch, kv_spec, sc_spec, grid, cfg: DCfg, paged: bool):
    B, N, H = q.shape
    K = grid[1]
    G = N // K
    q4 = q.reshape(B, K, G, H)
    qspec = pl.BlockSpec((None, None, G, H), lambda b, h, j, *_: (b, h, 0, 0))
    args, specs = [q4, k, v], [qspec, kv_spec, kv_spec]
    if cfg.quantized:
        args += list(scales)
        specs += [sc_spec, sc_spec]
    (o,) = compat.pallas_call(
        functools.partial(_kernel, cfg=cfg, paged=paged),
        out_shape=[jax.ShapeDtypeStruct(q4.shape, q.dtype)], grid=grid, in_specs=specs,
        out_specs=[qspec], num_scalar_prefetch=len(prefetch),
        scratch_shapes=[compat.vmem_scratch((G, 1), F32), compat.vmem_scratch((G, 1), F32),
                        compat.vmem_scratch((G, H), F32)],
        compiler_params=compat.tpu_params(("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="paged_attention_tpu" if paged else "decode_attention_tpu",
    )(*prefetch, *args)
    return o.reshape(B, N, H)


def decode(q_BNH, k_BSKH, v_BSKH, lengths_B, k_scale_BSK, v_scale_BSK, cfg: DCfg):
    """Contiguous cache: grid (B, K, S / block)."""
    B, S, K, H = k_BSKH.shape
    bs = cfg.block
    last = lambda b, j, lens: jnp.minimum(j, jnp.maximum(lens[b] - 1, 0) // bs)
    if H % 128 == 0:  # read the cache in place: [B, S, K*H], tile (bs, H) at column block h
        k, v = k_BSKH.reshape(B, S, K * H), v_BSKH.reshape(B, S, K * H)
        kv_spec = pl.BlockSpec((None, bs, H), lambda b, h, j, lens: (b, last(b, j, lens), h))
    else:  # a head dim under 128 lanes must be the full minor dim: go head-major
        k, v = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)
        kv_spec = pl.BlockSpec((None, None, bs, H), lambda b, h, j, lens: (b, h, last(b, j, lens), 0))
    scales = ()
    if cfg.quantized:
        scales = tuple(s.astype(F32).transpose(0, 2, 1)[:, :, None, :] for s in (k_scale_BSK, v_scale_BSK))
    sc_spec = pl.BlockSpec((None, None, 1, bs), lambda b, h, j, lens: (b, h, 0, last(b, j, lens)))
    return _run(q_BNH, k, v, scales, [lengths_B.astype(jnp.int32)], kv_spec, sc_spec,
                (B, K, S // bs), cfg, paged=False)


def paged(q_BNH, k_PLKH, v_PLKH, table_BM, lengths_B, k_scale_PLK, v_scale_PLK, cfg: DCfg):
    """Paged cache: grid (B, K, pages per sequence), one page per step; needs H % 128 == 0."""
    P, L, K, H = k_PLKH.shape
    B, M = table_BM.shape

    def page(b, j, lens, table):
        return table[b, jnp.minimum(j, jnp.maximum(lens[b] - 1, 0) // L)]

    k, v = k_PLKH.reshape(P, L, K * H), v_PLKH.reshape(P, L, K * H)
    kv_spec = pl.BlockSpec((None, L, H), lambda b, h, j, lens, table: (page(b, j, lens, table), 0, h))
    scales = ()
    if cfg.quantized:
        scales = tuple(s.astype(F32).transpose(0, 2, 1)[:, :, None, :] for s in (k_scale_PLK, v_scale_PLK))
    sc_spec = pl.BlockSpec((None, None, 1, L), lambda b, h, j, lens, table: (page(b, j, lens, table), h, 0, 0))
    prefetch = [lengths_B.astype(jnp.int32), table_BM.astype(jnp.int32)]
    return _run(q_BNH, k, v, scales, prefetch, kv_spec, sc_spec, (B, K, M), cfg, paged=True)
