"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS error compensation.

The column sweep GPTQ uses, with pruning in place of rounding: with H = 2 X^T X / M from the
calibration inputs (dampened), and U the upper Cholesky factor of H^-1, the columns (inputs)
are visited in order; zeroing weight j of a row costs w_j^2 / U_jj^2, and its error
(w_j / U_jj) is spread over the row's later columns along U[j, j:]. The mask is chosen
lazily: per block of 128 columns for unstructured sparsity (the lowest costs in the block),
per group of M columns for N:M, each just before its columns are visited, so it sees the
updates from earlier columns. Updates to columns after the block are applied once per block.
Plain numpy in float64: the layers here are small, and f64 keeps the Cholesky honest.
"""

from __future__ import annotations

import numpy as np


def inverse_hessian_factor(hessian_II: np.ndarray, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(upper Cholesky factor U of (H + damp * mean(diag H) * 1)^-1, dead-input mask [I]).

    An input that never fired (H_ii = 0) gets H_ii = 1: its weights do nothing on the
    calibration data and are pruned first."""
    h = np.array(hessian_II, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    h_inv = np.linalg.inv(h)
    return np.linalg.cholesky((h_inv + h_inv.T) / 2).T, dead


def _block_prune_mask(w_OJ: np.ndarray, d_J: np.ndarray, sparsity: float) -> np.ndarray:
    """Pruned-mask [O, J]: the round(sparsity * O * J) lowest w^2 / d^2 of the block."""
    cost = (w_OJ / d_J[None]) ** 2
    flat = np.argsort(cost.reshape(-1), kind="stable")[: round(sparsity * cost.size)]
    mask = np.zeros(cost.size, bool)
    mask[flat] = True
    return mask.reshape(cost.shape)


def _group_prune_mask(w_OM: np.ndarray, d_M: np.ndarray, n: int) -> np.ndarray:
    """Pruned-mask [O, M]: all but the n highest w^2 / d^2 of each row's group."""
    cost = (w_OM / d_M[None]) ** 2
    order = np.argsort(-cost, axis=1, kind="stable")
    mask = np.ones(cost.shape, bool)
    np.put_along_axis(mask, order[:, :n], False, axis=1)
    return mask


def sparsegpt(w_IO: np.ndarray, hessian_II: np.ndarray, sparsity: float | None = None,
              pattern: tuple[int, int] | None = None, block: int = 128,
              damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """(pruned W [I, O], keep mask [I, O]) of one linear by SparseGPT's column sweep."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity and pattern")
    if pattern is not None and block % pattern[1]:
        raise ValueError(f"block {block} is not a multiple of the pattern's group {pattern[1]}")
    u_II, dead = inverse_hessian_factor(hessian_II, damp)
    w_OI = np.array(w_IO, np.float64).T  # rows are outputs, as in the paper
    w_OI[:, dead] = 0.0
    o, i = w_OI.shape
    pruned = np.zeros((o, i), bool)
    for j1 in range(0, i, block):
        j2 = min(j1 + block, i)
        w1, u1 = w_OI[:, j1:j2].copy(), u_II[j1:j2, j1:j2]
        err1 = np.zeros_like(w1)
        mask1 = _block_prune_mask(w1, np.diag(u1), sparsity) if pattern is None else np.zeros(w1.shape, bool)
        for j in range(j2 - j1):
            if pattern is not None and j % pattern[1] == 0:
                m = pattern[1]
                mask1[:, j:j + m] = _group_prune_mask(w1[:, j:j + m], np.diag(u1)[j:j + m], pattern[0])
            w = w1[:, j]
            q = np.where(mask1[:, j], 0.0, w)
            err = (w - q) / u1[j, j]
            w1[:, j:] -= np.outer(err, u1[j, j:])
            w1[:, j] = q
            err1[:, j] = err
        w_OI[:, j1:j2] = w1
        w_OI[:, j2:] -= err1 @ u_II[j1:j2, j2:]
        pruned[:, j1:j2] = mask1
    w_OI[pruned] = 0.0
    return w_OI.T.astype(np.asarray(w_IO).dtype), ~pruned.T
