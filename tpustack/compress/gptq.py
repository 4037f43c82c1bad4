"""GPTQ (Frantar et al. 2022): quantize a linear column by column, compensating each column's
error on the columns not yet quantized through the Cholesky factor of H^-1.

For W [K, N] (K inputs) and calibration inputs X [M, K]: H = 2 X^T X / M, dampened by
`percdamp` x its mean diagonal; U = the upper Cholesky factor of H^-1. Input row k is
rounded to the group's min-max grid (tpustack.model.grouped), and its error e / U[k, k]
is spread over the rows after it within the current block of 128 (U's row k); the rows
after the block get the block's errors at once (the lazy batch update). A group's scale
and zero point are set from the already-updated weights when its first row comes up;
with act-order, rows go in decreasing H diagonal order and the group grids are fixed
from the original weights first ("static groups"), so groups stay contiguous in storage.
"""

from __future__ import annotations

import numpy as np

from tpustack.model.grouped import grid_params, round_to_grid


def hessian(x_MK: np.ndarray) -> np.ndarray:
    """H = 2 X^T X / M of calibration inputs X [M, K] (an f32 matmul, returned as f64)."""
    x = np.asarray(x_MK, np.float32)
    return (2.0 / x.shape[0]) * (x.T @ x).astype(np.float64)


def _inverse_cholesky_upper(h_KK: np.ndarray) -> np.ndarray:
    """Upper U with U^T U = H^-1 (what the reference gets by cholesky -> cholesky_inverse -> cholesky)."""
    lower = np.linalg.cholesky(h_KK)
    eye = np.eye(h_KK.shape[0])
    inv = np.linalg.solve(lower.T, np.linalg.solve(lower, eye))
    return np.linalg.cholesky(inv).T


def gptq_quantize(w_KN: np.ndarray, h_KK: np.ndarray, bits: int, group: int, block: int = 128,
                  percdamp: float = 0.01, act_order: bool = False, sym: bool = False) -> dict[str, np.ndarray]:
    """{"q" [K, N] u8, "scale"/"zero" [K/group, N], "w" [K, N] the dequantized weights} of W
    (sym: the symmetric grid of rtn.grid_params)."""
    k, n = w_KN.shape
    w = np.asarray(w_KN, np.float64).T.copy()  # [N, K]: the reference's layout, columns = inputs
    h = np.array(h_KK, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    static = [grid_params(w[:, g:g + group].T, bits, sym) for g in range(0, k, group)] if act_order else None
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h[np.arange(k), np.arange(k)] += percdamp * np.mean(np.diag(h))
    u = _inverse_cholesky_upper(h)
    q = np.zeros((n, k))
    scales, zeros = np.zeros((k // group, n), np.float32), np.zeros((k // group, n), np.float32)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].copy(), np.zeros((n, i2 - i1))
        for i in range(i2 - i1):
            col = perm[i1 + i]
            g = col // group
            if static is not None:
                scales[g], zeros[g] = static[g]
            elif col % group == 0:  # the group's grid from the weights as updated so far
                ahead = np.concatenate([w1[:, i:], w[:, i2:]], axis=1)[:, :group]
                scales[g], zeros[g] = grid_params(ahead.T, bits, sym)
            qc = round_to_grid(w1[:, i], scales[g], zeros[g], bits)
            dq = (qc - zeros[g]) * scales[g]
            q[:, i1 + i] = qc
            e = (w1[:, i] - dq) / u[i1 + i, i1 + i]
            w1[:, i:] -= np.outer(e, u[i1 + i, i1 + i:i2])
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    inv = np.argsort(perm)
    q = q[:, inv].T
    deq = (q - np.repeat(zeros, group, axis=0)) * np.repeat(scales, group, axis=0)
    return {"q": q.astype(np.uint8), "scale": scales, "zero": zeros.astype(np.uint8), "w": deq.astype(np.float32)}
