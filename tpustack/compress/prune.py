"""Unstructured and N:M (2:4) weight pruning: magnitude, Wanda and SparseGPT, and the packed
2:4 format (the kept values plus a 2-bit position per value).

Weights are [I, O] here (input rows, output columns, as the model stores them). An N:M group
is M consecutive inputs of one output column: the reduction dimension, as sparse tensor
cores want it. Wanda scores |W_io| * ||X_i||_2 and compares within each output (its paper's
per-output group); magnitude compares across the whole matrix (the paper's baseline);
SparseGPT (tpustack.compress.sparsegpt) is the OBS column sweep with the calibration Hessian.
The embedding, the LM head and the norms are never pruned.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterator

import jax
import numpy as np

from tpustack.compress.sparsegpt import sparsegpt
from tpustack.compress.sweep import LINEARS, linear_matrix, sweep
from tpustack.config import ModelConfig

METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(text: str) -> tuple[int, int]:
    """'2:4' -> (2, 4): keep N of every M."""
    n, m = (int(v) for v in text.split(":"))
    if not 0 < n < m:
        raise ValueError(f"pattern {text!r}: need 0 < N < M")
    return n, m


def nm_keep(score_IO: np.ndarray, n: int = 2, m: int = 4) -> np.ndarray:
    """Keep mask [I, O]: the n highest scores of every m consecutive inputs of each output."""
    i, o = score_IO.shape
    if i % m:
        raise ValueError(f"{i} inputs do not split into groups of {m}")
    groups_GMO = score_IO.reshape(i // m, m, o)
    # stable: among equal scores the earlier input is kept, so a group always keeps exactly n
    order = np.argsort(-groups_GMO, axis=1, kind="stable")
    keep = np.zeros_like(groups_GMO, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return keep.reshape(i, o)


def topk_keep(score: np.ndarray, sparsity: float, axis: int | None) -> np.ndarray:
    """Keep mask: all but the round(sparsity * size) lowest scores, along `axis` (None: the whole array)."""
    if axis is None:
        flat = score.reshape(-1)
        drop = np.argsort(flat, kind="stable")[: round(sparsity * flat.size)]
        keep = np.ones(flat.size, bool)
        keep[drop] = False
        return keep.reshape(score.shape)
    order = np.argsort(score, axis=axis, kind="stable")
    drop = round(sparsity * score.shape[axis])
    keep = np.ones(score.shape, bool)
    np.put_along_axis(keep, np.take(order, np.arange(drop), axis=axis), False, axis=axis)
    return keep


def magnitude_keep(w_IO: np.ndarray, sparsity: float | None, pattern: tuple[int, int] | None) -> np.ndarray:
    """Keep mask by |W|: N:M within each group, else across the whole matrix."""
    score = np.abs(w_IO)
    return nm_keep(score, *pattern) if pattern else topk_keep(score, sparsity, axis=None)


def wanda_keep(w_IO: np.ndarray, xnorm_I: np.ndarray, sparsity: float | None,
               pattern: tuple[int, int] | None) -> np.ndarray:
    """Keep mask by |W_io| * ||X_i||_2, compared within each output column."""
    score = np.abs(w_IO) * xnorm_I[:, None]
    return nm_keep(score, *pattern) if pattern else topk_keep(score, sparsity, axis=0)


def prune_matrix(method: str, w_IO: np.ndarray, x_MI: np.ndarray | None, sparsity: float | None,
                 pattern: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """(pruned W [I, O], keep mask [I, O]) of one linear, given its calibration inputs X [M, I]."""
    if method == "magnitude":
        keep = magnitude_keep(w_IO, sparsity, pattern)
        return w_IO * keep, keep
    x64 = np.asarray(x_MI, np.float64)
    if method == "wanda":
        keep = wanda_keep(w_IO, np.sqrt(np.sum(x64 * x64, axis=0)), sparsity, pattern)
        return w_IO * keep, keep
    if method == "sparsegpt":
        hessian_II = 2.0 * (x64.T @ x64) / x64.shape[0]
        return sparsegpt(w_IO, hessian_II, sparsity, pattern)
    raise ValueError(f"unknown pruning method {method!r}; one of {METHODS}")


def prune_model(cfg: ModelConfig, params: dict, tokens_BT: np.ndarray | None, method: str,
                sparsity: float | None = None, pattern: tuple[int, int] | None = None,
                progress: Callable[[int], None] | None = None) -> tuple[dict, dict]:
    """(pruned params, {"layer_i/attn/q": keep mask [I, O], ...}) of every block's linears.

    Magnitude needs no calibration (tokens_BT may be None); Wanda and SparseGPT take each
    block's inputs through the already-pruned blocks before it."""
    if (sparsity is None) == (pattern is None):
        raise ValueError("give exactly one of sparsity and pattern")
    masks: dict[str, np.ndarray] = {}

    def prune_block(i: int, layer: dict, inputs: dict) -> dict:
        layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
        for (module, name) in LINEARS:
            w = np.asarray(layer[module][name])
            x = None if inputs is None else np.asarray(inputs[(module, name)])
            pruned, keep = prune_matrix(method, linear_matrix(w, (module, name)), x, sparsity, pattern)
            layer[module][name] = pruned.reshape(w.shape).astype(w.dtype)
            masks[f"layer_{i}/{module}/{name}"] = keep
        return layer

    if method == "magnitude":
        out = dict(params)
        for i in range(cfg.num_layers):
            out[f"layer_{i}"] = prune_block(i, params[f"layer_{i}"], None)
            if progress is not None:
                progress(i)
        return out, masks
    return sweep(cfg, params, tokens_BT, prune_block, progress), masks


def apply_masks(params: dict, masks: dict) -> dict:
    """Params with every masked linear's pruned weights set to zero again (after a fine-tune step)."""
    out = dict(params)
    for key, keep in masks.items():
        layer, module, name = key.split("/")
        w = out[layer][module][name]
        out[layer] = {**out[layer], module: {**out[layer][module], name: w * keep.reshape(w.shape).astype(w.dtype)}}
    return out


def sparsity_report(cfg: ModelConfig, params: dict) -> dict[str, float]:
    """Zero share of the pruned linears, and parameter counts (all, and nonzero)."""
    zeros = total = 0
    for i in range(cfg.num_layers):
        for module, name in LINEARS:
            w = np.asarray(params[f"layer_{i}"][module][name])
            zeros += int(np.sum(w == 0))
            total += w.size
    leaves = jax.tree.leaves(params)
    n_all = sum(int(np.prod(a.shape)) for a in leaves)
    return {"linear_sparsity": zeros / total, "params": n_all, "nonzero_params": n_all - zeros}


def pack_2to4(w_IO: np.ndarray) -> dict[str, Any]:
    """A 2:4-sparse [I, O] as {"values" [I/2, O], "index" uint8 (four 2-bit positions a byte), "shape"}.

    The positions are those of each group's 2 largest |w| (earlier first on ties), so a matrix
    with at most 2 nonzeros per group of 4 inputs round-trips exactly through unpack_2to4."""
    i, o = w_IO.shape
    keep = nm_keep(np.abs(w_IO), 2, 4).reshape(i // 4, 4, o)
    pos_G2O = np.sort(np.argsort(~keep, axis=1, kind="stable")[:, :2], axis=1)  # the two kept positions
    values = np.take_along_axis(w_IO.reshape(i // 4, 4, o), pos_G2O, axis=1).reshape(i // 2, o)
    codes = pos_G2O.astype(np.uint8).reshape(-1)
    codes = np.concatenate([codes, np.zeros((-codes.size) % 4, np.uint8)]).reshape(-1, 4)
    index = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
    return {"values": values, "index": index.astype(np.uint8), "shape": (i, o)}


def unpack_2to4(packed: dict[str, Any]) -> np.ndarray:
    """The dense [I, O] of pack_2to4's output."""
    i, o = packed["shape"]
    index = packed["index"]
    codes = np.stack([(index >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[: (i // 2) * o]
    pos_G2O = codes.reshape(i // 4, 2, o).astype(np.int64)
    dense_G4O = np.zeros((i // 4, 4, o), packed["values"].dtype)
    np.put_along_axis(dense_G4O, pos_G2O, packed["values"].reshape(i // 4, 2, o), axis=1)
    return dense_G4O.reshape(i, o)


def packed_bytes(packed: dict[str, Any]) -> int:
    """Bytes of a packed 2:4 matrix as stored: values plus indices."""
    return packed["values"].nbytes + packed["index"].nbytes


def block_linears(cfg: ModelConfig, params: dict) -> Iterator[np.ndarray]:
    """Every block linear's weight as [I, O] numpy."""
    for i in range(cfg.num_layers):
        for key in LINEARS:
            yield linear_matrix(params[f"layer_{i}"][key[0]][key[1]], key)


def packed_bits_per_weight(cfg: ModelConfig, params: dict) -> float:
    """Bits per weight of the block linears packed as 2:4 (f32 values: (2 * 32 + 2 * 2) / 4 = 17)."""
    total = n = 0
    for w in block_linears(cfg, params):
        total += packed_bytes(pack_2to4(w))
        n += math.prod(w.shape)
    return 8 * total / n
