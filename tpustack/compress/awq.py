"""AWQ (Lin et al. 2023): scale salient input channels up before rounding, and fold the inverse
scale into whatever produces those inputs, so the float function is unchanged; then clip.

For the linears that read one activation X [M, K] (q/k/v; gate/up; down; the LM head), the
per-input-channel scale is s = mean|X|^alpha (normalised by sqrt(max s * min s)), alpha on
the 20-point grid 0, 0.05, ..., 0.95, choosing the alpha whose RTN-quantized
(W * s) / s gives the smallest output error over the calibration tokens (as in the paper's
code: for q/k/v, the attention block's output with o in float, on whole sequences; for
gate/up, the whole MLP's output, down in float; else the linear's own output). The inverse scale is folded into the
preceding RMSNorm weight (q/k/v, gate/up, head) or the preceding linear's output columns
(down <- up; o <- v when there are as many kv heads as heads). o under grouped-query
attention has no per-channel producer to fold into and is plain RTN.

Clipping (the paper's auto_clip), after the folds, on the rescaled inputs X / s: per input
group and output column, the grid range [lo, hi] shrinks to (1 - i / 20) [lo, hi],
i = 0..9, keeping the shrink whose group-partial output X_g (W_g - Q(W_g)) has the smallest
mean square; the float weight is clamped to the chosen range, so RTN's min-max grid of the
clamped weight is that range. q and k are not clipped (the paper: their error goes through the
softmax). A linear keeps its clip only where its whole output error does not rise. Off by
default (quantize_model(awq_clip=...)): on runs/small_12m it lowers every linear's calibration
error and raises the held-out loss (docs/compression.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.model.grouped import dequantize_grouped, quantize_grouped

GRID = 20
CLIP_GRID, CLIP_MAX_SHRINK = 20, 0.5  # the paper's auto_clip: shrinks 0, 0.05, ..., 0.45


def _rtn(w_KN: np.ndarray, bits: int, group: int) -> np.ndarray:
    return dequantize_grouped(quantize_grouped(w_KN, bits, group))


def _sample_rows(x_MK: np.ndarray, max_rows: int) -> np.ndarray:
    if x_MK.shape[0] > max_rows:
        return np.asarray(x_MK)[np.random.default_rng(0).choice(x_MK.shape[0], max_rows, replace=False)]
    return np.asarray(x_MK)


def search_scale(x_MK: np.ndarray, ws_KN: list[np.ndarray], bits: int, group: int,
                 output=None, max_rows: int = 4096) -> tuple[np.ndarray, float, float]:
    """(s [K], best alpha, its error): `output(x, [w...])` maps the inputs and the (fake-quantized)
    weights to the output whose squared error is minimised; default: the linears' outputs. The
    mean |x| uses every row; the error, a seeded sample of `max_rows` of them (20 evaluations each)."""
    output = output or (lambda x, ws: jnp.concatenate([x @ w for w in ws], axis=-1))
    x_mean = np.abs(np.asarray(x_MK, np.float64)).mean(axis=0)
    x = jnp.asarray(_sample_rows(x_MK, max_rows), jnp.float32)
    ref = output(x, [jnp.asarray(w) for w in ws_KN])
    best = (np.ones(x_MK.shape[1]), 0.0, np.inf)
    for alpha in np.arange(GRID) / GRID:
        s = np.maximum(x_mean, 1e-8) ** alpha
        s = s / np.sqrt(s.max() * s.min())
        fq = [jnp.asarray(_rtn(w * s[:, None], bits, group) / s[:, None]) for w in ws_KN]
        err = float(jnp.mean(jnp.square(output(x, fq) - ref)))
        if err < best[2]:
            best = (s, float(alpha), err)
    return best


@jax.jit
def _group_errors(x_MgG: jax.Array, dw_gGN: jax.Array) -> jax.Array:
    """Mean square of each group's partial output error: [g, N]."""
    return jnp.mean(jnp.square(jnp.einsum("mgk,gkn->mgn", x_MgG, dw_gGN)), axis=0)


def _clip_range(w_GgN: np.ndarray, shrink: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """The min-max range (0 always inside) of each group and column, shrunk: lo, hi [g, N]."""
    lo, hi = np.minimum(w_GgN.min(axis=1), 0.0), np.maximum(w_GgN.max(axis=1), 0.0)
    return lo * (1 - shrink), hi * (1 - shrink)


def search_clip(x_MK: np.ndarray, w_KN: np.ndarray, bits: int, group: int,
                max_rows: int = 4096) -> tuple[np.ndarray, np.ndarray, dict]:
    """(clamped W [K, N], shrink [K/group, N], {"err_rtn", "err_clip"}): the paper's auto_clip on
    calibration inputs x. Falls back to no clipping if the whole output's error would rise."""
    k, n = w_KN.shape
    x = _sample_rows(x_MK, max_rows).astype(np.float32)
    x_MgG = jnp.asarray(x.reshape(len(x), k // group, group))
    w_gGN = np.asarray(w_KN, np.float32).reshape(k // group, group, n)
    best_err = np.full((k // group, n), np.inf)
    best = np.zeros((k // group, n), np.float32)
    for i in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
        lo, hi = _clip_range(w_gGN, i / CLIP_GRID)
        wc = np.clip(w_gGN, lo[:, None], hi[:, None]).reshape(k, n)
        dw = (w_KN - _rtn(wc, bits, group)).reshape(k // group, group, n)
        err = np.asarray(_group_errors(x_MgG, jnp.asarray(dw)))
        better = err < best_err
        best_err, best = np.where(better, err, best_err), np.where(better, i / CLIP_GRID, best)
    lo, hi = _clip_range(w_gGN, best)
    clipped = np.clip(w_gGN, lo[:, None], hi[:, None]).reshape(k, n)
    xj = jnp.asarray(x)
    errs = {name: float(jnp.mean(jnp.square(xj @ jnp.asarray(w_KN - _rtn(w, bits, group)))))
            for name, w in (("err_rtn", w_KN), ("err_clip", clipped))}
    if errs["err_clip"] > errs["err_rtn"]:
        return np.asarray(w_KN, np.float32), np.zeros_like(best), errs
    return clipped, best, errs


def clip_linear(w: np.ndarray, x_MK: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, float]:
    """A linear param of any shape (its [K, N] view is reshape(K, -1)) clipped; (w, mean shrink)."""
    k = x_MK.shape[1]
    clipped, shrink, _ = search_clip(x_MK, np.asarray(w, np.float32).reshape(k, -1), bits, group)
    return clipped.reshape(np.shape(w)), float(shrink.mean())


def _attention_output(cfg, seq_len: int, o_KD: np.ndarray):
    """output(x, [q, k, v]) for search_scale: the attention block's output (o in float) on whole
    sequences, so q/k's rounding is weighed through rope and the softmax, as in the paper."""
    from tpustack.model.layers import apply_rope, grouped_attention, rope_tables

    n, kv, h = cfg.num_heads, cfg.num_kv_heads, cfg.heads_dim
    cos, sin = rope_tables(jnp.arange(seq_len)[None], h, cfg.rope_theta)
    mask = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))[None]
    o = jnp.asarray(o_KD)

    def output(x, ws):
        b = x.shape[0] // seq_len
        q = apply_rope((x @ ws[0]).reshape(b, seq_len, n, h), cos, sin)
        k = apply_rope((x @ ws[1]).reshape(b, seq_len, kv, h), cos, sin)
        v = (x @ ws[2]).reshape(b, seq_len, kv, h)
        return grouped_attention(q, k, v, mask).reshape(b * seq_len, n * h) @ o
    return output


def awq_layer(cfg, layer: dict, inputs: dict[str, np.ndarray], bits: int, group: int,
              clip: bool = False, seq_len: int | None = None) -> tuple[dict, dict]:
    """Search and fold one layer's scales in place on its float param dict, then (clip) clamp v, o,
    gate, up and down; return (layer, {group: alpha, "clip_<name>": mean shrink}). With seq_len
    (the rows of `inputs` are whole sequences of that length) q/k/v's scale minimises the
    attention output's error; without, the error of q/k/v's own outputs."""
    attn, mlp = layer["attn"], layer["mlp"]
    d = cfg.d_model
    alphas = {}
    qkv = [np.asarray(attn[n]).reshape(d, -1) for n in ("q", "k", "v")]
    if seq_len:
        rows = max(1, 4096 // seq_len) * seq_len  # whole sequences, the first ones (windows are random)
        o_KD = np.asarray(attn["o"]).reshape(-1, d)
        s, alphas["qkv"], _ = search_scale(inputs["attn_in"][:rows], qkv, bits, group,
                                           _attention_output(cfg, seq_len, o_KD))
    else:
        s, alphas["qkv"], _ = search_scale(inputs["attn_in"], qkv, bits, group)
    scaled = {"attn_in": inputs["attn_in"] / s}
    layer["attn_norm"]["scale"] = np.asarray(layer["attn_norm"]["scale"]) / s
    for n in ("q", "k", "v"):
        attn[n] = np.asarray(attn[n]) * s.reshape(-1, *([1] * (np.ndim(attn[n]) - 1)))
    gate, up, down = (np.asarray(mlp[n]) for n in ("gate", "up", "down"))

    def gate_up_output(x, ws):  # the MLP's output, down held in float: the search rounds gate/up only
        return (jax.nn.silu(x @ ws[0]) * (x @ ws[1])) @ jnp.asarray(down)
    s, alphas["gate_up"], _ = search_scale(inputs["mlp_in"], [gate, up], bits, group, gate_up_output)
    scaled["mlp_in"] = inputs["mlp_in"] / s
    layer["mlp_norm"]["scale"] = np.asarray(layer["mlp_norm"]["scale"]) / s
    mlp["gate"], mlp["up"] = gate * s[:, None], up * s[:, None]
    # down's input silu(x gate) * (x up) is unchanged by the fold above
    s, alphas["down"], _ = search_scale(inputs["down_in"], [down], bits, group)
    scaled["down_in"] = inputs["down_in"] / s
    mlp["up"] = mlp["up"] / s[None, :]
    mlp["down"] = down * s[:, None]
    scaled["o_in"] = inputs["o_in"]
    if cfg.num_heads == cfg.num_kv_heads:
        o = np.asarray(attn["o"]).reshape(cfg.num_heads * cfg.heads_dim, d)
        s, alphas["o"], _ = search_scale(inputs["o_in"], [o], bits, group)
        scaled["o_in"] = inputs["o_in"] / s
        attn["v"] = np.asarray(attn["v"]) / s.reshape(1, *np.shape(attn["v"])[1:])
        attn["o"] = (o * s[:, None]).reshape(np.shape(attn["o"]))
    if clip:
        for sub, name, x in (("attn", "v", "attn_in"), ("attn", "o", "o_in"), ("mlp", "gate", "mlp_in"),
                             ("mlp", "up", "mlp_in"), ("mlp", "down", "down_in")):
            layer[sub][name], alphas[f"clip_{name}"] = clip_linear(layer[sub][name], scaled[x], bits, group)
    return layer, alphas
