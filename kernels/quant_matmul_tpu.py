"""Quantized matmuls for TPU (Pallas Mosaic): int8 and int4 weight-only, and w8a8.

Grid (M / bm, N / bn, K / bk) with an f32 (int32 for w8a8) accumulator in VMEM. The
weight tile is converted in VMEM, so HBM only ever holds int8 / packed int4 bytes.
int4 packs row i with row i + K/2 (see reference.quantize_int4): the kernel reads the
matching x tiles as two BlockSpecs on the same array, so no lane shuffles are needed;
each 128-row group is scaled after its dot. Per-channel scales multiply the output tile.
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
PARAMS = ("parallel", "parallel", "arbitrary")


def _int8_kernel(x_ref, w_ref, s_ref, o_ref, acc, *, nk):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, acc.dtype)

    x = x_ref[...]
    acc[...] += jnp.dot(x, w_ref[...].astype(x.dtype), preferred_element_type=F32)

    @pl.when(kk == nk - 1)
    def _done():
        o_ref[...] = (acc[...] * s_ref[...]).astype(o_ref.dtype)


def _int4_kernel(xlo_ref, xhi_ref, w_ref, slo_ref, shi_ref, o_ref, acc, *, nk, groups):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, acc.dtype)

    w = w_ref[...].astype(jnp.int32)
    lo = lax.shift_right_arithmetic(lax.shift_left(w, 28), 28)  # sign-extended low nibble
    hi = lax.shift_right_arithmetic(w, 4)
    x_lo, x_hi = xlo_ref[...], xhi_ref[...]
    dt = x_lo.dtype
    total = jnp.zeros(acc.shape, F32)
    for g in range(groups):  # static: one 128-row group per dot, scaled per group
        r = slice(g * INT4_GROUP, (g + 1) * INT4_GROUP)
        d_lo = jnp.dot(x_lo[:, r], lo[r].astype(F32).astype(dt), preferred_element_type=F32)
        d_hi = jnp.dot(x_hi[:, r], hi[r].astype(F32).astype(dt), preferred_element_type=F32)
        total += d_lo * slo_ref[g] + d_hi * shi_ref[g]
    acc[...] += total

    @pl.when(kk == nk - 1)
    def _done():
        o_ref[...] = acc[...].astype(o_ref.dtype)


def _w8a8_kernel(x_ref, xs_ref, w_ref, s_ref, o_ref, acc, *, nk):
    kk = pl.program_id(2)

    @pl.when(kk == 0)
    def _init():
        acc[...] = jnp.zeros(acc.shape, acc.dtype)

    acc[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.int32)

    @pl.when(kk == nk - 1)
    def _done():
        o_ref[...] = (acc[...].astype(F32) * xs_ref[...] * s_ref[...]).astype(o_ref.dtype)


def _call(kernel, args, specs, out_dtype, M, N, bm, bn, grid, acc_dtype, interpret, name):
    (o,) = compat.pallas_call(
        kernel, out_shape=[jax.ShapeDtypeStruct((M, N), out_dtype)], grid=grid, in_specs=specs,
        out_specs=[pl.BlockSpec((bm, bn), lambda i, j, kk: (i, j))],
        scratch_shapes=[compat.vmem_scratch((bm, bn), acc_dtype)],
        compiler_params=compat.tpu_params(PARAMS), interpret=interpret, name=name)(*args)
    return o


def int8(x_MK, w_KN, scale_N, bm, bn, bk, interpret):
    """x @ (w * scale): M padded to bm by the caller; N % bn == K % bk == 0."""
    M, K = x_MK.shape
    N = w_KN.shape[1]
    nk = K // bk
    specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
             pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
             pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))]
    args = [x_MK, w_KN, scale_N.astype(F32).reshape(1, N)]
    return _call(functools.partial(_int8_kernel, nk=nk), args, specs, x_MK.dtype, M, N, bm, bn,
                 (M // bm, N // bn, nk), F32, interpret, "int8_matmul_tpu")


def int4(x_MK, packed_KN, scale_GN, bm, bn, bk, interpret):
    """x @ dequant(packed): bk counts packed rows per step (a multiple of 128)."""
    M, K = x_MK.shape
    N = packed_KN.shape[1]
    nk = (K // 2) // bk
    gb = bk // INT4_GROUP
    specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
             pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk + nk)),
             pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
             pl.BlockSpec((gb, 1, bn), lambda i, j, kk: (kk, 0, j)),
             pl.BlockSpec((gb, 1, bn), lambda i, j, kk: (kk + nk, 0, j))]
    s = scale_GN.astype(F32).reshape(-1, 1, N)
    args = [x_MK, x_MK, packed_KN, s, s]
    return _call(functools.partial(_int4_kernel, nk=nk, groups=gb), args, specs, x_MK.dtype, M, N, bm, bn,
                 (M // bm, N // bn, nk), F32, interpret, "int4_matmul_tpu")


def w8a8(xq_MK, xs_M1, w_KN, scale_N, out_dtype, bm, bn, bk, interpret):
    """int8 x int8 -> int32 on the MXU, then per-token x per-channel scales."""
    M, K = xq_MK.shape
    N = w_KN.shape[1]
    nk = K // bk
    specs = [pl.BlockSpec((bm, bk), lambda i, j, kk: (i, kk)),
             pl.BlockSpec((bm, 1), lambda i, j, kk: (i, 0)),
             pl.BlockSpec((bk, bn), lambda i, j, kk: (kk, j)),
             pl.BlockSpec((1, bn), lambda i, j, kk: (0, j))]
    args = [xq_MK, xs_M1.astype(F32), w_KN, scale_N.astype(F32).reshape(1, N)]
    return _call(functools.partial(_w8a8_kernel, nk=nk), args, specs, out_dtype, M, N, bm, bn,
                 (M // bm, N // bn, nk), jnp.int32, interpret, "w8a8_matmul_tpu")
