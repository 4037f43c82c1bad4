"""AWQ (Lin et al. 2023): scale salient input channels up before rounding, and fold the inverse
scale into whatever produces those inputs, so the float function is unchanged.

For the linears that read one activation X [M, K] (q/k/v; gate/up; down; the LM head), the
per-input-channel scale is s = mean|X|^alpha (normalised by sqrt(max s * min s)), alpha on
the 20-point grid 0, 0.05, ..., 0.95, choosing the alpha whose RTN-quantized
(W * s) / s gives the smallest output error over the calibration tokens (for gate/up, the
error of the whole MLP's output, down in float). The inverse scale is folded into the
preceding RMSNorm weight (q/k/v, gate/up, head) or the preceding linear's output columns
(down <- up; o <- v when there are as many kv heads as heads). o under grouped-query
attention has no per-channel producer to fold into and is plain RTN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.model.grouped import dequantize_grouped, quantize_grouped

GRID = 20


def _rtn(w_KN: np.ndarray, bits: int, group: int) -> np.ndarray:
    return dequantize_grouped(quantize_grouped(w_KN, bits, group))


def search_scale(x_MK: np.ndarray, ws_KN: list[np.ndarray], bits: int, group: int,
                 output=None, max_rows: int = 4096) -> tuple[np.ndarray, float, float]:
    """(s [K], best alpha, its error): `output(x, [w...])` maps the inputs and the (fake-quantized)
    weights to the output whose squared error is minimised; default: the linears' outputs. The
    mean |x| uses every row; the error, a seeded sample of `max_rows` of them (20 evaluations each)."""
    output = output or (lambda x, ws: jnp.concatenate([x @ w for w in ws], axis=-1))
    x_mean = np.abs(np.asarray(x_MK, np.float64)).mean(axis=0)
    if x_MK.shape[0] > max_rows:
        x_MK = np.asarray(x_MK)[np.random.default_rng(0).choice(x_MK.shape[0], max_rows, replace=False)]
    x = jnp.asarray(x_MK, jnp.float32)
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


def awq_layer(cfg, layer: dict, inputs: dict[str, np.ndarray], bits: int, group: int) -> tuple[dict, dict]:
    """Search and fold one layer's scales in place on its float param dict; return (layer, alphas)."""
    attn, mlp = layer["attn"], layer["mlp"]
    d = cfg.d_model
    alphas = {}
    qkv = [np.asarray(attn[n]).reshape(d, -1) for n in ("q", "k", "v")]
    s, alphas["qkv"], _ = search_scale(inputs["attn_in"], qkv, bits, group)
    layer["attn_norm"]["scale"] = np.asarray(layer["attn_norm"]["scale"]) / s
    for n in ("q", "k", "v"):
        attn[n] = np.asarray(attn[n]) * s.reshape(-1, *([1] * (np.ndim(attn[n]) - 1)))
    gate, up, down = (np.asarray(mlp[n]) for n in ("gate", "up", "down"))

    def gate_up_output(x, ws):  # the MLP's output, down held in float: the search rounds gate/up only
        return (jax.nn.silu(x @ ws[0]) * (x @ ws[1])) @ jnp.asarray(down)
    s, alphas["gate_up"], _ = search_scale(inputs["mlp_in"], [gate, up], bits, group, gate_up_output)
    layer["mlp_norm"]["scale"] = np.asarray(layer["mlp_norm"]["scale"]) / s
    mlp["gate"], mlp["up"] = gate * s[:, None], up * s[:, None]
    # down's input silu(x gate) * (x up) is unchanged by the fold above
    s, alphas["down"], _ = search_scale(inputs["down_in"], [down], bits, group)
    mlp["up"] = mlp["up"] / s[None, :]
    mlp["down"] = down * s[:, None]
    if cfg.num_heads == cfg.num_kv_heads:
        o = np.asarray(attn["o"]).reshape(cfg.num_heads * cfg.heads_dim, d)
        s, alphas["o"], _ = search_scale(inputs["o_in"], [o], bits, group)
        attn["v"] = np.asarray(attn["v"]) / s.reshape(1, *np.shape(attn["v"])[1:])
        attn["o"] = (o * s[:, None]).reshape(np.shape(attn["o"]))
    return layer, alphas
