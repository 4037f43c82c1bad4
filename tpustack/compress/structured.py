"""Structured pruning: remove whole attention heads and FFN channels, giving a smaller model.

Importance is the calibration norm of what a head or channel adds to the residual stream:
||o_n(X) @ W_o[n]||_F for head n (o_n its attention output over the calibration tokens),
||h_f(X)||_2 * ||W_down[f]||_2 for FFN channel f (h = silu(gate) * up). Every block keeps the
same number of heads and channels, so one ModelConfig still describes the model.

GQA: `heads=N` removes N query heads per block. When K (kv heads) divides N, each kv group
loses its N/K least important query heads and all K kv heads stay (num_heads stays a
multiple of num_kv_heads); otherwise, when the group size G divides N, the N/G least
important whole kv groups go (their k/v heads with them). Anything else is refused.
head_dim is written into the config, since d_model // num_heads no longer gives it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from tpustack.compress.sweep import sweep
from tpustack.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class StructuredSpec:
    heads: int = 0  # query heads removed per block
    ffn: float = 0.0  # share of FFN channels removed per block


def parse_structured(text: str) -> StructuredSpec:
    """'heads=2,ffn=0.25' -> StructuredSpec(2, 0.25); a ValueError names what is wrong."""
    values: dict = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key == "heads":
            values["heads"] = int(value)
        elif key == "ffn":
            values["ffn"] = float(value)
        else:
            raise ValueError(f"unknown key {key!r}; use heads=N,ffn=FRACTION")
    spec = StructuredSpec(**values)
    if spec.heads < 0 or not 0.0 <= spec.ffn < 1.0 or (spec.heads == 0 and spec.ffn == 0.0):
        raise ValueError("need heads >= 0, 0 <= ffn < 1, and something to remove")
    return spec


def pruned_config(cfg: ModelConfig, spec: StructuredSpec) -> ModelConfig:
    """The smaller model's config; a ValueError when heads=N does not fit the GQA groups."""
    n, k = cfg.num_heads, cfg.num_kv_heads
    g = n // k
    if spec.heads >= n:
        raise ValueError(f"heads={spec.heads}: the model has only {n} heads per block")
    if spec.heads % k == 0:
        new_k = k
    elif spec.heads % g == 0:
        new_k = k - spec.heads // g
    else:
        raise ValueError(f"heads={spec.heads}: with {n} heads over {k} kv heads, remove a multiple of "
                         f"{k} (heads from every kv group) or of {g} (whole kv groups)")
    ffn = cfg.ffn_dim - round(spec.ffn * cfg.ffn_dim)
    return dataclasses.replace(cfg, num_heads=n - spec.heads, num_kv_heads=new_k, head_dim=cfg.heads_dim,
                               ffn_dim=ffn)


def head_scores(o_MNH: np.ndarray, w_o_NHD: np.ndarray) -> np.ndarray:
    """[N] Frobenius norm of each head's contribution o_n @ W_o[n] over the calibration rows."""
    return np.array([np.linalg.norm(o_MNH[:, n] @ w_o_NHD[n]) for n in range(w_o_NHD.shape[0])])


def channel_scores(h_MF: np.ndarray, w_down_FD: np.ndarray) -> np.ndarray:
    """[F] ||h_f||_2 * ||W_down[f]||_2: the norm of channel f's rank-1 contribution."""
    return np.linalg.norm(h_MF, axis=0) * np.linalg.norm(w_down_FD, axis=1)


def kept_heads(scores_N: np.ndarray, num_kv_heads: int, new_cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """(kept query heads, kept kv heads), ascending, by the rule in the module docstring."""
    n = len(scores_N)
    g = n // num_kv_heads
    groups_KG = scores_N.reshape(num_kv_heads, g)
    if new_cfg.num_kv_heads == num_kv_heads:
        new_g = new_cfg.num_heads // num_kv_heads
        top = np.sort(np.argsort(-groups_KG, axis=1, kind="stable")[:, :new_g], axis=1)
        return (top + np.arange(num_kv_heads)[:, None] * g).reshape(-1), np.arange(num_kv_heads)
    kv = np.sort(np.argsort(-groups_KG.sum(axis=1), kind="stable")[: new_cfg.num_kv_heads])
    return (kv[:, None] * g + np.arange(g)[None]).reshape(-1), kv


def prune_block(layer: dict, inputs: dict, cfg: ModelConfig, new_cfg: ModelConfig) -> tuple[dict, dict]:
    """(smaller block params, {"heads": kept heads, "kv_heads": ..., "ffn": kept channels})."""
    attn, mlp = layer["attn"], layer["mlp"]
    h = cfg.heads_dim
    o_MNH = np.asarray(inputs[("attn", "o")]).reshape(-1, cfg.num_heads, h)
    heads, kv = kept_heads(head_scores(o_MNH, np.asarray(attn["o"])), cfg.num_kv_heads, new_cfg)
    chans = np.sort(np.argsort(-channel_scores(np.asarray(inputs[("mlp", "down")]), np.asarray(mlp["down"])),
                               kind="stable")[: new_cfg.ffn_dim])
    new = dict(layer)
    new["attn"] = {"q": np.asarray(attn["q"])[:, heads], "k": np.asarray(attn["k"])[:, kv],
                   "v": np.asarray(attn["v"])[:, kv], "o": np.asarray(attn["o"])[heads]}
    new["mlp"] = {"gate": np.asarray(mlp["gate"])[:, chans], "up": np.asarray(mlp["up"])[:, chans],
                  "down": np.asarray(mlp["down"])[chans]}
    return new, {"heads": heads, "kv_heads": kv, "ffn": chans}


def prune_structured(cfg: ModelConfig, params: dict, tokens_BT: np.ndarray, spec: StructuredSpec,
                     progress: Callable[[int], None] | None = None) -> tuple[ModelConfig, dict, list[dict]]:
    """(smaller config, its params, per block the kept heads / kv heads / channels)."""
    new_cfg = pruned_config(cfg, spec)
    kept: list[dict] = []

    def one(i: int, layer: dict, inputs: dict) -> dict:
        new, keep = prune_block(layer, inputs, cfg, new_cfg)
        kept.append(keep)
        return new

    return new_cfg, sweep(cfg, params, tokens_BT, one, progress), kept
