"""Flash attention forward and backward for TPU (Pallas Mosaic).

Layouts: the public q [B, T, N, H], k/v [B, S, K, H]. When H % 128 == 0 the kernels read
them in place through the free reshape [B, T, N*H] (a (block, H) tile is a legal Mosaic
block); otherwise the wrapper transposes to [B, N, T, H] so the tile spans the full
head dim. Grouped-query heads map query head n to kv head n // G in the index maps:
K/V are never repeated. T and S are padded to the block sizes; padded keys are masked
by position, padded queries carry zero cotangents so they add nothing to dK/dV.

Causal kernels clamp the kv (or q) block index to the last (first) block a tile needs,
so skipped grid steps re-use the resident block and issue no DMA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import compat
from ._dispatch import round_up
from ._online_softmax import online_softmax_step
from .compat import MASK_VALUE, pl

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Cfg:
    """Static parameters of one attention call (hashable: a custom_vjp nondiff arg)."""
    causal: bool
    sm_scale: float
    soft_cap: float | None
    block_q: int
    block_k: int
    interpret: bool
    has_seg: bool


def check(T: int, S: int, H: int, dtype, block_q: int, block_k: int) -> str | None:
    """None if the TPU kernel takes this problem, else why not."""
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(F32)):
        return f"dtype {jnp.dtype(dtype).name} unsupported (bf16 or f32)"
    if block_q % 8:
        return f"block_q={block_q} must be a multiple of 8 (TPU sublanes)"
    if round_up(S, 8) > block_k and block_k % 128:
        return f"block_k={block_k} must be a multiple of 128 (TPU lanes) when it does not cover S={S}"
    return None


def blocks(T: int, S: int, block_q: int, block_k: int) -> tuple[int, int, int, int]:
    """(bq, bk, T_padded, S_padded): a block covering a short sequence shrinks to it."""
    bq = min(block_q, round_up(T, 8))
    bk = min(block_k, round_up(S, 8))
    return bq, bk, round_up(T, bq), round_up(S, bk)


class _Layout:
    """BlockSpecs for [B, T, N, H]-origin tensors in the in-place or head-major layout."""

    def __init__(self, H: int):
        self.inplace = H % 128 == 0
        self.H = H

    def to_kernel(self, x_BTNH, pad_T: int):
        B, T, N, H = x_BTNH.shape
        x = jnp.pad(x_BTNH, ((0, 0), (0, pad_T - T), (0, 0), (0, 0)))
        return x.reshape(B, pad_T, N * H) if self.inplace else x.transpose(0, 2, 1, 3)

    def from_kernel(self, x, B: int, T: int, N: int):
        x = x.reshape(B, -1, N, self.H) if self.inplace else x.transpose(0, 2, 1, 3)
        return x[:, :T]

    def spec(self, blk: int, idx):
        """idx(*grid) -> (b, head, seq_block)."""
        if self.inplace:
            return pl.BlockSpec((None, blk, self.H), lambda *g: (idx(*g)[0], idx(*g)[2], idx(*g)[1]))
        return pl.BlockSpec((None, None, blk, self.H), lambda *g: (*idx(*g), 0))


def _mask(cfg: Cfg, i, j, bq, bk, off, kv_len, qs_ref, ks_ref):
    rows = i * bq + lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    cols = j * bk + lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    mask = cols < kv_len
    if cfg.causal:
        mask &= cols <= rows + off
    if cfg.has_seg:
        mask &= qs_ref[...] == ks_ref[...]
    return mask


def _scores(cfg: Cfg, q, k):
    """Capped, scaled logits and the tanh needed by the backward (or None)."""
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=F32) * cfg.sm_scale
    if cfg.soft_cap:
        t = jnp.tanh(s / cfg.soft_cap)
        return cfg.soft_cap * t, t
    return s, None


def _needed(cfg: Cfg, i, j, bq, bk, off, kv_len):
    ok = j * bk < kv_len
    if cfg.causal:
        ok &= j * bk <= (i + 1) * bq - 1 + off
    return ok


def _split(refs, cfg: Cfg, n_in: int):
    ins = list(refs[:n_in])
    seg = (ins.pop(), ins.pop())[::-1] if cfg.has_seg else (None, None)
    return ins, seg, refs[n_in:]


def _fwd_kernel(*refs, cfg: Cfg, bq, bk, nk, off, kv_len):
    (q_ref, k_ref, v_ref), (qs_ref, ks_ref), (o_ref, lse_ref, m_sc, l_sc, acc_sc) = \
        _split(refs, cfg, 3 + 2 * cfg.has_seg)
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, F32)
        l_sc[...] = jnp.zeros(l_sc.shape, F32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, F32)

    @pl.when(_needed(cfg, i, j, bq, bk, off, kv_len))
    def _step():
        s, _ = _scores(cfg, q_ref[...], k_ref[...])
        mask = _mask(cfg, i, j, bq, bk, off, kv_len, qs_ref, ks_ref)
        p, alpha = online_softmax_step(s, mask, m_sc, l_sc, MASK_VALUE)
        v = v_ref[...]
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=F32)

    @pl.when(j == nk - 1)
    def _done():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] * jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(jnp.where(l > 0, l, 1.0))


def _kv_block(cfg: Cfg, i, j, bq, bk, off, kv_len):
    """Clamp j to the last kv block query block i needs: repeated indices skip the DMA."""
    last = (kv_len - 1) // bk
    if cfg.causal:
        last = jnp.minimum(last, jnp.maximum((i + 1) * bq - 1 + off, 0) // bk)
    return jnp.minimum(j, last)


def _q_block(cfg: Cfg, i, j, bq, bk, off):
    """Clamp i to the first q block that sees kv block j (causal backward)."""
    if not cfg.causal:
        return i
    return jnp.maximum(i, jnp.maximum(j * bk - off, 0) // bq)


def _common(q, k, cfg: Cfg):
    B, T, N, H = q.shape
    S, K = k.shape[1], k.shape[2]
    bq, bk, Tp, Sp = blocks(T, S, cfg.block_q, cfg.block_k)
    return B, T, N, H, S, K, N // K, bq, bk, Tp, Sp, S - T, _Layout(H)


def _seg_inputs(qs, ks, Tp, Sp, T, S, bq, bk, qidx, kidx):
    qs = jnp.pad(qs.astype(jnp.int32), ((0, 0), (0, Tp - T)), constant_values=-1)[:, :, None]
    ks = jnp.pad(ks.astype(jnp.int32), ((0, 0), (0, Sp - S)), constant_values=-2)[:, None, :]
    specs = [pl.BlockSpec((None, bq, 1), lambda *g: (qidx(*g)[0], qidx(*g)[2], 0)),
             pl.BlockSpec((None, 1, bk), lambda *g: (kidx(*g)[0], 0, kidx(*g)[2]))]
    return [qs, ks], specs


def forward(q, k, v, qs, ks, cfg: Cfg):
    """Returns (o [B, T, N, H], lse [B, N, Tp, 1] f32)."""
    B, T, N, H, S, K, G, bq, bk, Tp, Sp, off, lay = _common(q, k, cfg)
    nq, nk = Tp // bq, Sp // bk
    qidx = lambda b, n, i, j: (b, n, i)
    kidx = lambda b, n, i, j: (b, n // G, _kv_block(cfg, i, j, bq, bk, off, S))
    args = [lay.to_kernel(q, Tp), lay.to_kernel(k, Sp), lay.to_kernel(v, Sp)]
    specs = [lay.spec(bq, qidx), lay.spec(bk, kidx), lay.spec(bk, kidx)]
    if cfg.has_seg:
        a, s = _seg_inputs(qs, ks, Tp, Sp, T, S, bq, bk, qidx, kidx)
        args, specs = args + a, specs + s
    o_shape = jax.ShapeDtypeStruct(args[0].shape, q.dtype)
    lse_shape = jax.ShapeDtypeStruct((B, N, Tp, 1), F32)
    kern = functools.partial(_fwd_kernel, cfg=cfg, bq=bq, bk=bk, nk=nk, off=off, kv_len=S)
    o, lse = compat.pallas_call(
        kern, out_shape=[o_shape, lse_shape], grid=(B, N, nq, nk), in_specs=specs,
        out_specs=[lay.spec(bq, qidx), pl.BlockSpec((None, None, bq, 1), lambda b, n, i, j: (b, n, i, 0))],
        scratch_shapes=[compat.vmem_scratch((bq, 1), F32), compat.vmem_scratch((bq, 1), F32),
                        compat.vmem_scratch((bq, H), F32)],
        compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="flash_fwd_tpu")(*args)
    return lay.from_kernel(o, B, T, N), lse


def _bwd_common(cfg, i, j, bq, bk, off, kv_len, q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref,
                qs_ref, ks_ref):
    """p and dS (d logits before scale) for one (q block, kv block) tile."""
    q, k = q_ref[...], k_ref[...]
    s, t = _scores(cfg, q, k)
    mask = _mask(cfg, i, j, bq, bk, off, kv_len, qs_ref, ks_ref)
    p = jnp.where(mask, jnp.exp(s - lse_ref[...]), 0.0)
    do = do_ref[...]
    dp = lax.dot_general(do, v_ref[...], (((1,), (1,)), ((), ())), preferred_element_type=F32)
    ds = p * (dp - di_ref[...])
    if t is not None:
        ds = ds * (1.0 - t * t)
    return q, k, do, p, ds * cfg.sm_scale


def _dq_kernel(*refs, cfg: Cfg, bq, bk, nk, off, kv_len):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qs_ref, ks_ref), (dq_ref, acc) = \
        _split(refs, cfg, 6 + 2 * cfg.has_seg)
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, F32)

    @pl.when(_needed(cfg, i, j, bq, bk, off, kv_len))
    def _step():
        _, k, _, _, ds = _bwd_common(cfg, i, j, bq, bk, off, kv_len, q_ref, k_ref, v_ref,
                                     do_ref, lse_ref, di_ref, qs_ref, ks_ref)
        acc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=F32)

    @pl.when(j == nk - 1)
    def _done():
        dq_ref[...] = acc[...].astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Cfg, bq, bk, G, nq, off, kv_len):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref), (qs_ref, ks_ref), (dk_ref, dv_ref, dk_acc, dv_acc) = \
        _split(refs, cfg, 6 + 2 * cfg.has_seg)
    j, g, i = pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_acc[...] = jnp.zeros(dk_acc.shape, F32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, F32)

    @pl.when(_needed(cfg, i, j, bq, bk, off, kv_len))
    def _step():
        q, _, do, p, ds = _bwd_common(cfg, i, j, bq, bk, off, kv_len, q_ref, k_ref, v_ref,
                                      do_ref, lse_ref, di_ref, qs_ref, ks_ref)
        tn = (((0,), (0,)), ((), ()))  # contract the q-block axis: p^T @ dO, dS^T @ q
        dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, tn, preferred_element_type=F32)
        dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, tn, preferred_element_type=F32)

    @pl.when((g == G - 1) & (i == nq - 1))
    def _done():
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def backward(q, k, v, qs, ks, o, lse, do, cfg: Cfg):
    """(dq, dk, dv) from the saved forward output and logsumexp; O(S) memory."""
    B, T, N, H, S, K, G, bq, bk, Tp, Sp, off, lay = _common(q, k, cfg)
    nq, nk = Tp // bq, Sp // bk
    di = jnp.einsum("btnh,btnh->bnt", do.astype(F32), o.astype(F32))
    di = jnp.pad(di, ((0, 0), (0, 0), (0, Tp - T)))[..., None]
    base = [lay.to_kernel(q, Tp), lay.to_kernel(k, Sp), lay.to_kernel(v, Sp), lay.to_kernel(do, Tp), lse, di]
    row_spec = lambda idx: pl.BlockSpec((None, None, bq, 1), lambda *g: (idx(*g)[0], idx(*g)[1], idx(*g)[2], 0))
    params = dict(cfg=cfg, bq=bq, bk=bk, off=off, kv_len=S)

    # dq: grid (B, N, q block, kv block), reduce over kv blocks.
    qidx = lambda b, n, i, j: (b, n, i)
    kidx = lambda b, n, i, j: (b, n // G, _kv_block(cfg, i, j, bq, bk, off, S))
    specs = [lay.spec(bq, qidx), lay.spec(bk, kidx), lay.spec(bk, kidx), lay.spec(bq, qidx),
             row_spec(qidx), row_spec(qidx)]
    args = list(base)
    if cfg.has_seg:
        a, s = _seg_inputs(qs, ks, Tp, Sp, T, S, bq, bk, qidx, kidx)
        args, specs = args + a, specs + s
    (dq,) = compat.pallas_call(
        functools.partial(_dq_kernel, nk=nk, **params),
        out_shape=[jax.ShapeDtypeStruct(base[0].shape, q.dtype)], grid=(B, N, nq, nk),
        in_specs=specs, out_specs=[lay.spec(bq, qidx)],
        scratch_shapes=[compat.vmem_scratch((bq, H), F32)],
        compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret, name="flash_dq_tpu")(*args)

    # dk, dv: grid (B, K, kv block, group, q block), reduce over the G query heads and q blocks.
    qidx2 = lambda b, h, j, g, i: (b, h * G + g, _q_block(cfg, i, j, bq, bk, off))
    kidx2 = lambda b, h, j, g, i: (b, h, j)
    specs = [lay.spec(bq, qidx2), lay.spec(bk, kidx2), lay.spec(bk, kidx2), lay.spec(bq, qidx2),
             row_spec(qidx2), row_spec(qidx2)]
    args = list(base)
    if cfg.has_seg:
        a, s = _seg_inputs(qs, ks, Tp, Sp, T, S, bq, bk, qidx2, kidx2)
        args, specs = args + a, specs + s
    kv_struct = jax.ShapeDtypeStruct(base[1].shape, k.dtype)
    dk, dv = compat.pallas_call(
        functools.partial(_dkv_kernel, G=G, nq=nq, **params),
        out_shape=[kv_struct, kv_struct], grid=(B, K, nk, G, nq), in_specs=specs,
        out_specs=[lay.spec(bk, kidx2), lay.spec(bk, kidx2)],
        scratch_shapes=[compat.vmem_scratch((bk, H), F32), compat.vmem_scratch((bk, H), F32)],
        compiler_params=compat.tpu_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        interpret=cfg.interpret, name="flash_dkv_tpu")(*args)
    return lay.from_kernel(dq, B, T, N), lay.from_kernel(dk, B, S, K), lay.from_kernel(dv, B, S, K)
