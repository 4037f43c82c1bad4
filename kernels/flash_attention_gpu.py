"""Flash attention forward and backward for GPU (Pallas, Triton lowering).

Same contract as flash_attention_tpu (Cfg, forward, backward), but the layout is read
in place ([B, T, N, H] blocks with the head squeezed) and the kv loop runs inside the
kernel (lax.fori_loop), the usual shape on GPUs. Triton tiles need power-of-two sizes
of at least 16. Grouped-query heads: query head n reads kv head n // G; the dK/dV
kernel walks the G query heads of its kv head, so K/V are never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import compat
from ._dispatch import is_pow2, round_up
from .compat import MASK_VALUE, pl
from .flash_attention_tpu import Cfg

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))
NT = (((1,), (1,)), ((), ()))
TN = (((0,), (0,)), ((), ()))


def check(T: int, S: int, H: int, dtype, block_q: int, block_k: int) -> str | None:
    """None if the GPU kernel takes this problem, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(F32)):
        return f"dtype {jnp.dtype(dtype).name} unsupported"
    if not (is_pow2(H) and 16 <= H <= 256):
        return f"head dim H={H} must be a power of two in [16, 256] (Triton tiles)"
    if not (is_pow2(block_q) and is_pow2(block_k) and block_q >= 16 and block_k >= 16):
        return f"blocks ({block_q}, {block_k}) must be powers of two >= 16 (Triton tiles)"
    return None


def _blocks(T, S, cfg: Cfg):
    bq = min(cfg.block_q, max(16, pl.next_power_of_2(T)))
    bk = min(cfg.block_k, max(16, pl.next_power_of_2(S)))
    return bq, bk, round_up(T, bq), round_up(S, bk)


def _logits(cfg: Cfg, q, k, rows, cols, off, kv_len, qs, ks):
    s = lax.dot_general(q, k, NT, preferred_element_type=F32) * cfg.sm_scale
    t = None
    if cfg.soft_cap:
        t = jnp.tanh(s / cfg.soft_cap)
        s = cfg.soft_cap * t
    mask = cols[None, :] < kv_len
    if cfg.causal:
        mask &= cols[None, :] <= rows[:, None] + off
    if qs is not None:
        mask &= qs[:, None] == ks[None, :]
    return jnp.where(mask, s, MASK_VALUE), mask, t


def _kv_hi(cfg: Cfg, i, bq, bk, nk, off):
    """Number of kv blocks query block i needs (causal skips the rest)."""
    if not cfg.causal:
        return nk
    return jnp.clip(lax.div((i + 1) * bq + off + bk - 1, bk), 0, nk)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, cfg, bq, bk, nk, off, kv_len):
    i = pl.program_id(0)
    q = q_ref[...]
    rows = i * bq + jnp.arange(bq)
    qs = None if qs_ref is None else qs_ref[...]

    def body(j, carry):
        acc, m, l = carry
        sl = pl.ds(j * bk, bk)
        ks = None if ks_ref is None else ks_ref[sl]
        s, mask, _ = _logits(cfg, q, k_ref[sl, :], rows, j * bk + jnp.arange(bk), off, kv_len, qs, ks)
        m_new = jnp.maximum(m, s.max(axis=1))
        p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[sl, :]
        acc = alpha[:, None] * acc + lax.dot_general(p.astype(v.dtype), v, NN, preferred_element_type=F32)
        return acc, m_new, alpha * l + p.sum(axis=1)

    init = (jnp.zeros(o_ref.shape, F32), jnp.full((bq,), MASK_VALUE, F32), jnp.zeros((bq,), F32))
    acc, m, l = lax.fori_loop(0, _kv_hi(cfg, i, bq, bk, nk, off), body, init)
    safe = jnp.where(l > 0, l, 1.0)
    o_ref[...] = (acc * jnp.where(l > 0, 1.0 / safe, 0.0)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(safe)


def _pad(x, n, axis, value=0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _segs(qs, ks, Tp, Sp):
    if qs is None:
        return None, None
    return _pad(qs.astype(jnp.int32), Tp, 1, -1), _pad(ks.astype(jnp.int32), Sp, 1, -2)


def _drop_none(kernel, present):
    """Re-insert None for the optional refs that were not passed to pallas_call."""
    def k(*refs):
        it = iter(refs)
        return kernel(*[next(it) if p else None for p in present], *it)
    return k


def forward(q, k, v, qs, ks, cfg: Cfg):
    """Returns (o [B, T, N, H], lse [B, N, Tp] f32)."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk, Tp, Sp = _blocks(T, S, cfg)
    qp, kp, vp = _pad(q, Tp, 1), _pad(k, Sp, 1), _pad(v, Sp, 1)
    qsp, ksp = _segs(qs, ks, Tp, Sp)
    qspec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kspec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    args, specs = [qp, kp, vp], [qspec, kspec, kspec]
    if qs is not None:
        args += [qsp, ksp]
        specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)), pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0))]
    kern = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nk=Sp // bk, off=S - T, kv_len=S)
    o, lse = compat.pallas_call(
        _drop_none(kern, [True, True, True, qs is not None, qs is not None]),
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype), jax.ShapeDtypeStruct((B, N, Tp), F32)],
        grid=(Tp // bq, B, N), in_specs=specs,
        out_specs=[qspec, pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
        compiler_params=None if cfg.interpret else compat.triton_params(4 if H <= 64 else 8, 2),
        interpret=cfg.interpret, name="flash_fwd_gpu")(*args)
    return o[:, :T], lse


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, *, cfg, bq, bk, nk, off, kv_len):
    i = pl.program_id(0)
    q, do, lse, di = q_ref[...], do_ref[...], lse_ref[...], di_ref[...]
    rows = i * bq + jnp.arange(bq)
    qs = None if qs_ref is None else qs_ref[...]

    def body(j, acc):
        sl = pl.ds(j * bk, bk)
        ks = None if ks_ref is None else ks_ref[sl]
        k = k_ref[sl, :]
        s, mask, t = _logits(cfg, q, k, rows, j * bk + jnp.arange(bk), off, kv_len, qs, ks)
        p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
        dp = lax.dot_general(do, v_ref[sl, :], NT, preferred_element_type=F32)
        ds = p * (dp - di[:, None])
        if t is not None:
            ds = ds * (1.0 - t * t)
        return acc + lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=F32)

    acc = lax.fori_loop(0, _kv_hi(cfg, i, bq, bk, nk, off), body, jnp.zeros(dq_ref.shape, F32))
    dq_ref[...] = (acc * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dk_ref, dv_ref, *,
                cfg, bq, bk, nq, G, off, kv_len):
    j = pl.program_id(0)
    k, v = k_ref[...], v_ref[...]
    cols = j * bk + jnp.arange(bk)
    ks = None if ks_ref is None else ks_ref[...]
    lo = jnp.clip(lax.div(jnp.maximum(j * bk - off, 0), bq), 0, nq) if cfg.causal else 0
    dk = jnp.zeros(dk_ref.shape, F32)
    dv = jnp.zeros(dv_ref.shape, F32)
    for g in range(G):  # G is small and static: unrolled
        def body(i, carry, g=g):
            dk, dv = carry
            sl = pl.ds(i * bq, bq)
            q, do = q_ref[sl, g, :], do_ref[sl, g, :]
            qs = None if qs_ref is None else qs_ref[sl]
            s, mask, t = _logits(cfg, q, k, i * bq + jnp.arange(bq), cols, off, kv_len, qs, ks)
            p = jnp.where(mask, jnp.exp(s - lse_ref[g, sl][:, None]), 0.0)
            dv = dv + lax.dot_general(p.astype(do.dtype), do, TN, preferred_element_type=F32)
            dp = lax.dot_general(do, v, NT, preferred_element_type=F32)
            ds = p * (dp - di_ref[g, sl][:, None])
            if t is not None:
                ds = ds * (1.0 - t * t)
            return dk + lax.dot_general(ds.astype(q.dtype), q, TN, preferred_element_type=F32), dv
        dk, dv = lax.fori_loop(lo, nq, body, (dk, dv))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, qs, ks, o, lse, do, cfg: Cfg):
    """(dq, dk, dv) from the saved output and logsumexp; O(S) memory."""
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    G = N // K
    bq, bk, Tp, Sp = _blocks(T, S, cfg)
    di = _pad(jnp.einsum("btnh,btnh->bnt", do.astype(F32), o.astype(F32)), Tp, 2)
    qp, kp, vp, dop = _pad(q, Tp, 1), _pad(k, Sp, 1), _pad(v, Sp, 1), _pad(do, Tp, 1)
    qsp, ksp = _segs(qs, ks, Tp, Sp)
    has = qs is not None
    cp = None if cfg.interpret else compat.triton_params(4 if H <= 64 else 8, 2)
    common = dict(cfg=cfg, bq=bq, bk=bk, off=S - T, kv_len=S)

    qspec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kspec = pl.BlockSpec((None, Sp, None, H), lambda i, b, n: (b, 0, n // G, 0))
    rspec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    args, specs = [qp, kp, vp, dop, lse, di], [qspec, kspec, kspec, qspec, rspec, rspec]
    if has:
        args += [qsp, ksp]
        specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)), pl.BlockSpec((None, Sp), lambda i, b, n: (b, 0))]
    (dq,) = compat.pallas_call(
        _drop_none(functools.partial(_dq_kernel, nk=Sp // bk, **common), [True] * 6 + [has, has]),
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype)], grid=(Tp // bq, B, N), in_specs=specs,
        out_specs=[qspec], compiler_params=cp, interpret=cfg.interpret, name="flash_dq_gpu")(*args)

    # dK/dV: one program per (kv block, batch, kv head); q, dO viewed as [B, Tp, K, G, H].
    q5, do5 = qp.reshape(B, Tp, K, G, H), dop.reshape(B, Tp, K, G, H)
    qspec5 = pl.BlockSpec((None, Tp, None, G, H), lambda j, b, h: (b, 0, h, 0, 0))
    kspec = pl.BlockSpec((None, bk, None, H), lambda j, b, h: (b, j, h, 0))
    rspec = pl.BlockSpec((None, None, G, Tp), lambda j, b, h: (b, h, 0, 0))
    args = [q5, kp, vp, do5, lse.reshape(B, K, G, Tp), di.reshape(B, K, G, Tp)]
    specs = [qspec5, kspec, kspec, qspec5, rspec, rspec]
    if has:
        args += [qsp, ksp]
        specs += [pl.BlockSpec((None, Tp), lambda j, b, h: (b, 0)), pl.BlockSpec((None, bk), lambda j, b, h: (b, j))]
    kv = jax.ShapeDtypeStruct(kp.shape, k.dtype)
    dk, dv = compat.pallas_call(
        _drop_none(functools.partial(_dkv_kernel, nq=Tp // bq, G=G, **common), [True] * 6 + [has, has]),
        out_shape=[kv, kv], grid=(Sp // bk, B, K), in_specs=specs, out_specs=[kspec, kspec],
        compiler_params=cp, interpret=cfg.interpret, name="flash_dkv_gpu")(*args)
    return dq[:, :T], dk[:, :S], dv[:, :S]
