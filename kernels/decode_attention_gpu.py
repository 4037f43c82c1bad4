"""Decode attention for GPU (Pallas, Triton lowering): contiguous and paged caches.

One program per (sequence, kv head) serves that head's G query rows (padded to 16,
Triton's smallest dot tile) and loops over the cache up to the sequence's length,
so the work and the bytes read follow the real lengths, not the cache capacity.
int8 caches are converted after the load; scales multiply logits and probabilities.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import compat
from .compat import MASK_VALUE, pl
from .decode_attention_tpu import DCfg

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))


def _attend(cfg: DCfg, q, length, n_blocks, load):
    """Online softmax over blocks; load(j) -> (k, v, k_scale, v_scale) for block j."""
    bs = cfg.block

    def body(j, carry):
        acc, m, l = carry
        k, v, ks, vs = load(j)
        if cfg.quantized:
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        s = lax.dot_general(q, k, NT, preferred_element_type=F32)
        if cfg.quantized:
            s = s * ks[None, :]
        s = s * cfg.sm_scale
        if cfg.soft_cap:
            s = cfg.soft_cap * jnp.tanh(s / cfg.soft_cap)
        mask = (j * bs + jnp.arange(bs))[None, :] < length
        s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        l = alpha * l + p.sum(axis=1)
        if cfg.quantized:
            p = p * vs[None, :]
        acc = alpha[:, None] * acc + lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)
        return acc, m_new, l

    R = q.shape[0]
    init = (jnp.zeros((R, q.shape[1]), F32), jnp.full((R,), MASK_VALUE, F32), jnp.zeros((R,), F32))
    acc, _, l = lax.fori_loop(0, jnp.minimum(lax.div(length + bs - 1, bs), n_blocks), body, init)
    return acc * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[:, None]


def _decode_kernel(len_ref, q_ref, k_ref, v_ref, *rest, cfg: DCfg, n_blocks: int):
    ks_ref, vs_ref, o_ref = rest if cfg.quantized else (None, None, rest[0])
    length = len_ref[pl.program_id(0)]

    def load(j):
        sl = pl.ds(j * cfg.block, cfg.block)
        sc = (ks_ref[sl], vs_ref[sl]) if cfg.quantized else (None, None)
        return k_ref[sl, :], v_ref[sl, :], *sc

    o_ref[...] = _attend(cfg, q_ref[...], length, n_blocks, load).astype(o_ref.dtype)


def _paged_kernel(len_ref, table_ref, q_ref, k_ref, v_ref, *rest, cfg: DCfg, n_blocks: int):
    ks_ref, vs_ref, o_ref = rest if cfg.quantized else (None, None, rest[0])
    b, h = pl.program_id(0), pl.program_id(1)

    def load(j):
        page = table_ref[b, j]
        sc = (ks_ref[page, :, h], vs_ref[page, :, h]) if cfg.quantized else (None, None)
        return k_ref[page, :, h, :], v_ref[page, :, h, :], *sc

    o_ref[...] = _attend(cfg, q_ref[...], len_ref[b], n_blocks, load).astype(o_ref.dtype)


def _q_rows(q_BNH, K):
    B, N, H = q_BNH.shape
    G = N // K
    R = max(16, pl.next_power_of_2(G))
    q = jnp.pad(q_BNH.reshape(B, K, G, H), ((0, 0), (0, 0), (0, R - G), (0, 0)))
    return q, G, R


def _call(kernel, q4, args, specs, B, K, cfg: DCfg, name: str):
    R, H = q4.shape[2], q4.shape[3]
    qspec = pl.BlockSpec((None, None, R, H), lambda b, h: (b, h, 0, 0))
    (o,) = compat.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct(q4.shape, q4.dtype)], grid=(B, K),
        in_specs=[specs[0], qspec, *specs[1:]], out_specs=[qspec],
        compiler_params=None if cfg.interpret else compat.triton_params(4, 2),
        interpret=cfg.interpret, name=name)(args[0], q4, *args[1:])
    return o


def decode(q_BNH, k_BSKH, v_BSKH, lengths_B, k_scale_BSK, v_scale_BSK, cfg: DCfg):
    """Contiguous cache; S must be a multiple of cfg.block."""
    B, S, K, H = k_BSKH.shape
    q4, G, R = _q_rows(q_BNH, K)
    whole = pl.BlockSpec()  # no block shape: the kernel sees the whole array
    kv_spec = pl.BlockSpec((None, S, None, H), lambda b, h: (b, 0, h, 0))
    args = [lengths_B.astype(jnp.int32), k_BSKH, v_BSKH]
    specs = [whole, kv_spec, kv_spec]
    if cfg.quantized:
        sc = pl.BlockSpec((None, S, None), lambda b, h: (b, 0, h))
        args += [k_scale_BSK.astype(F32), v_scale_BSK.astype(F32)]
        specs += [sc, sc]
    kern = functools.partial(_decode_kernel, cfg=cfg, n_blocks=S // cfg.block)
    o = _call(kern, q4, args, specs, B, K, cfg, "decode_attention_gpu")
    return o[:, :, :G].reshape(q_BNH.shape)


def paged(q_BNH, k_PLKH, v_PLKH, table_BM, lengths_B, k_scale_PLK, v_scale_PLK, cfg: DCfg):
    """Paged cache: pages are read whole-array and indexed through the table."""
    P, L, K, H = k_PLKH.shape
    B, M = table_BM.shape
    q4, G, R = _q_rows(q_BNH, K)
    args = [lengths_B.astype(jnp.int32), table_BM.astype(jnp.int32), k_PLKH, v_PLKH]
    specs = [pl.BlockSpec()] * 4  # whole arrays: pages are gathered through the table
    if cfg.quantized:
        args += [k_scale_PLK.astype(F32), v_scale_PLK.astype(F32)]
        specs += [pl.BlockSpec()] * 2
    kern = functools.partial(_paged_kernel, cfg=cfg, n_blocks=M)
    qspec = pl.BlockSpec((None, None, R, H), lambda b, h: (b, h, 0, 0))
    (o,) = compat.pallas_call(
        kern, out_shape=[jax.ShapeDtypeStruct(q4.shape, q4.dtype)], grid=(B, K),
        in_specs=[specs[0], specs[1], qspec, *specs[2:]], out_specs=[qspec],
        compiler_params=None if cfg.interpret else compat.triton_params(4, 2),
        interpret=cfg.interpret, name="paged_attention_gpu")(args[0], args[1], q4, *args[2:])
    return o[:, :, :G].reshape(q_BNH.shape)
