"""Weight-only int8 / int4 matmuls for GPU (Pallas, Triton lowering).

Grid (M / bm, N / bn); each program walks K with a fori_loop so Triton can pipeline
the weight loads (num_stages). Weights are converted after the load: HBM holds only
int8 / packed int4. int4 steps one 128-row group at a time (its scale row applies
to the group's partial product), reading x[:, k] and x[:, k + K/2] for the two nibbles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import compat
from .compat import pl
from .reference import INT4_GROUP

F32 = jnp.float32
NN = (((1,), (0,)), ((), ()))


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, *, bk, nk):
    def body(kk, acc):
        sl = pl.ds(kk * bk, bk)
        x = x_ref[:, sl]
        return acc + lax.dot_general(x, w_ref[sl, :].astype(x.dtype), NN, preferred_element_type=F32)

    acc = lax.fori_loop(0, nk, body, jnp.zeros(o_ref.shape, F32))
    o_ref[...] = (acc * s_ref[...][None, :]).astype(o_ref.dtype)


def _int4_kernel(x_ref, w_ref, s_ref, o_ref, *, half, ng):
    g = INT4_GROUP

    def body(kk, acc):
        w = w_ref[pl.ds(kk * g, g), :].astype(jnp.int32)
        lo = lax.shift_right_arithmetic(lax.shift_left(w, 28), 28)
        hi = lax.shift_right_arithmetic(w, 4)
        x_lo = x_ref[:, pl.ds(kk * g, g)]
        x_hi = x_ref[:, pl.ds(half + kk * g, g)]
        dt = x_lo.dtype
        d_lo = lax.dot_general(x_lo, lo.astype(F32).astype(dt), NN, preferred_element_type=F32)
        d_hi = lax.dot_general(x_hi, hi.astype(F32).astype(dt), NN, preferred_element_type=F32)
        return acc + d_lo * s_ref[kk, :][None, :] + d_hi * s_ref[ng + kk, :][None, :]

    acc = lax.fori_loop(0, ng, body, jnp.zeros(o_ref.shape, F32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _params(interpret: bool):
    return None if interpret else compat.triton_params(num_warps=4, num_stages=3)


def int8(x_MK, w_KN, scale_N, bm, bn, bk, interpret):
    """x @ (w * scale); M % bm == N % bn == K % bk == 0."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    (o,) = compat.pallas_call(
        functools.partial(_int8_kernel, bk=bk, nk=K // bk),
        out_shape=[jax.ShapeDtypeStruct((M, N), x_MK.dtype)], grid=(M // bm, N // bn),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j: (i, 0)), pl.BlockSpec((K, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((bn,), lambda i, j: (j,))],
        out_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j))],
        compiler_params=_params(interpret), interpret=interpret, name="int8_matmul_gpu",
    )(x_MK, w_KN, scale_N.astype(F32))
    return o


def int4(x_MK, packed_KN, scale_GN, bm, bn, interpret):
    """x @ dequant(packed); one 128-row group of each half per loop step."""
    M, K = x_MK.shape
    N = packed_KN.shape[1]
    G = scale_GN.shape[0]
    (o,) = compat.pallas_call(
        functools.partial(_int4_kernel, half=K // 2, ng=G // 2),
        out_shape=[jax.ShapeDtypeStruct((M, N), x_MK.dtype)], grid=(M // bm, N // bn),
        in_specs=[pl.BlockSpec((bm, K), lambda i, j: (i, 0)), pl.BlockSpec((K // 2, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((G, bn), lambda i, j: (0, j))],
        out_specs=[pl.BlockSpec((bm, bn), lambda i, j: (i, j))],
        compiler_params=_params(interpret), interpret=interpret, name="int4_matmul_gpu",
    )(x_MK, packed_KN, scale_GN.astype(F32))
    return o
