"""The quantization driver: load_weights -> quantize (int8 | rtn | gptq | awq | nf4) -> write.

int8 and nf4 are the model's own formats (tpustack.model.quant.quantize_params); rtn, gptq and
awq write weight_quant="int4_zp" (3 or 4-bit codes, group-wise scales and zero points). GPTQ
walks the layers in order, each linear group's Hessian taken on the inputs the
already-quantized prefix produces (true-sequential: q/k/v, then o, gate/up, down); AWQ
searches its scales on the float model's activations (its folds leave the function unchanged),
then rounds. The embedding and norms stay in float.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from tpustack.compress import awq, gptq
from tpustack.compress.calibration import INPUT_GROUPS, embed, flat_weight, head_input, linear_inputs_jit
from tpustack.model.grouped import pack_codes, quantize_grouped
from tpustack.config import ModelConfig
from tpustack.model.quant import quantize_params
from tpustack.weights import source_config

METHODS = ("int8", "rtn", "gptq", "awq", "nf4")
NEEDS_CALIBRATION = ("gptq", "awq")


def _as_numpy(params: Any) -> dict:
    return jax.tree.map(lambda a: np.array(a, np.float32), jax.device_get(params))


def _set_flat(layer: dict, path: tuple[str, str], w_KN: np.ndarray) -> None:
    """Write a [K, N] weight back into the layer dict in its param shape."""
    sub, name = path
    layer[sub][name] = w_KN.reshape(np.shape(layer[sub][name])).astype(np.float32)


_WHERE = {"q": "attn", "k": "attn", "v": "attn", "o": "attn", "gate": "mlp", "up": "mlp", "down": "mlp"}


def _gptq_model(cfg: ModelConfig, params: dict, tokens: np.ndarray, bits: int, group: int,
                act_order: bool, progress: bool) -> dict[tuple, dict]:
    """GPTQ every linear, layer by layer on the quantized prefix; {path: {"q","scale","zero"}}."""
    out: dict[tuple, dict] = {}
    x = embed(params, tokens)
    total = cfg.num_layers * 7 + (0 if cfg.tie_embeddings else 1)
    bar = tqdm(total=total, desc="gptq", unit="linear", disable=not progress)
    for i in range(cfg.num_layers):
        layer = params[f"layer_{i}"]
        for group_name, names in INPUT_GROUPS:
            h = gptq.hessian(np.asarray(linear_inputs_jit(cfg, layer, x)[group_name]))
            for name in names:
                r = gptq.gptq_quantize(flat_weight(layer[_WHERE[name]][name], name), h, bits, group,
                                       act_order=act_order)
                _set_flat(layer, (_WHERE[name], name), r.pop("w"))
                out[(f"layer_{i}", _WHERE[name], name)] = r
                bar.update(1)
        x = linear_inputs_jit(cfg, layer, x)["out"]
    if not cfg.tie_embeddings:
        h = gptq.hessian(np.asarray(head_input(cfg, params, x)))
        r = gptq.gptq_quantize(np.asarray(params["lm_head"]), h, bits, group, act_order=act_order)
        r.pop("w")
        out[("lm_head",)] = r
        bar.update(1)
    bar.close()
    return out


def _awq_fold(cfg: ModelConfig, params: dict, tokens: np.ndarray, bits: int, group: int,
              clip: bool = False, attn_objective: bool = True) -> dict:
    """Search and fold AWQ scales into a float copy of the params (same function), then clip (which
    changes the float weights: only RTN of them is meant to run); returns alphas and shrinks."""
    x = embed(params, tokens)
    alphas = {}
    for i in range(cfg.num_layers):
        layer = params[f"layer_{i}"]
        inputs = {k: np.asarray(v) for k, v in linear_inputs_jit(cfg, layer, x).items()}
        x = inputs.pop("out")  # the next layer reads the float model's activations (clipping is not exact)
        _, alphas[f"layer_{i}"] = awq.awq_layer(cfg, layer, inputs, bits, group, clip,
                                                seq_len=tokens.shape[1] if attn_objective else None)
    if not cfg.tie_embeddings:
        x_head = np.asarray(head_input(cfg, params, x))
        s, alphas["lm_head"], _ = awq.search_scale(x_head, [params["lm_head"]], bits, group)
        params["final_norm"]["scale"] = params["final_norm"]["scale"] / s
        params["lm_head"] = params["lm_head"] * s[:, None]
        if clip:
            params["lm_head"], alphas["clip_lm_head"] = awq.clip_linear(params["lm_head"], x_head / s, bits, group)
    return alphas


def _rtn_all(cfg: ModelConfig, params: dict, bits: int, group: int) -> dict[tuple, dict]:
    out = {}
    for i in range(cfg.num_layers):
        for name, sub in _WHERE.items():
            out[(f"layer_{i}", sub, name)] = quantize_grouped(flat_weight(params[f"layer_{i}"][sub][name], name),
                                                              bits, group)
    if not cfg.tie_embeddings:
        out[("lm_head",)] = quantize_grouped(np.asarray(params["lm_head"]), bits, group)
    return out


def _pack_tree(params: dict, quantized: dict[tuple, dict]) -> dict:
    """The int4_zp tree: each quantized linear W -> W_codes, W_scale, W_zero; the rest as is."""
    tree = copy.deepcopy(params)
    for path, q in quantized.items():
        parent = tree
        for key in path[:-1]:
            parent = parent[key]
        name = path[-1]
        del parent[name]
        parent[f"{name}_codes"] = pack_codes(q["q"])
        parent[f"{name}_scale"] = np.asarray(q["scale"], np.float32)
        parent[f"{name}_zero"] = np.asarray(q["zero"], np.uint8)
    return tree


def quantize_model(cfg: ModelConfig, params: Any, method: str, bits: int = 4, group: int = 128,
                   tokens: np.ndarray | None = None, act_order: bool = False,
                   progress: bool = True, awq_clip: bool = False) -> tuple[ModelConfig, dict, dict]:
    """(quantized ModelConfig, quantized param tree (numpy), info) of unrolled float params.
    awq_clip: AWQ's weight-clipping search after its scales (off by default: on runs/small_12m it
    lowers each linear's calibration output error and raises the held-out loss; docs/compression.md)."""
    if method in ("int8", "nf4"):
        qparams = jax.tree.map(np.asarray, jax.device_get(quantize_params(params, method)))
        return dataclasses.replace(cfg, weight_quant=method), qparams, {"method": method}
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {METHODS}")
    widths = [cfg.d_model, cfg.num_heads * cfg.heads_dim, cfg.ffn_dim]
    if any(w % group or w % 2 for w in widths):
        raise ValueError(f"group {group} must divide every matmul input width {widths}")
    if method in NEEDS_CALIBRATION and tokens is None:
        raise ValueError(f"{method} needs calibration tokens")
    fparams = _as_numpy(params)
    info: dict[str, Any] = {"method": method, "bits": bits, "group": group}
    if method == "gptq":
        quantized = _gptq_model(cfg, fparams, tokens, bits, group, act_order, progress)
        info["act_order"] = act_order
    else:
        if method == "awq":
            info["alphas"] = _awq_fold(cfg, fparams, tokens, bits, group, clip=awq_clip)
            info["awq_clip"] = awq_clip
        quantized = _rtn_all(cfg, fparams, bits, group)
    if tokens is not None:
        info["calib_tokens"] = int(math.prod(tokens.shape))
    qcfg = dataclasses.replace(cfg, weight_quant="int4_zp", weight_group=group, scan_layers=False,
                               remat_policy="none")
    return qcfg, _pack_tree(fparams, quantized), info


def quantize_checkpoint(checkpoint: str, out: str, method: str, bits: int = 4, group: int = 128,
                        calib: int = 128, act_order: bool = False, seed: int = 0, progress: bool = True,
                        awq_clip: bool = False) -> dict:
    """load_weights(checkpoint) -> quantize -> write `out`; returns the info written (bytes included)."""
    from tpustack.compress.calibration import calibration_tokens
    from tpustack.interop.quantized_dir import write_quantized
    from tpustack.weights import load_weights

    cfg, params, _ = load_weights(checkpoint)
    config = source_config(checkpoint, cfg)
    tokens = calibration_tokens(config, calib, seed=seed) if method in NEEDS_CALIBRATION else None
    qcfg, qparams, info = quantize_model(cfg, params, method, bits, group, tokens, act_order, progress, awq_clip)
    matmul = sum(int(np.prod(np.shape(flat_weight(w, k[-1])))) for k, w in _linears(_as_numpy(params)))
    info.update(source=checkpoint, seed=seed)
    info["bytes"] = write_quantized(out, dataclasses.replace(config, model=qcfg), qparams, info)
    info["matmul_bytes_per_weight"] = _linear_bytes(qparams) / matmul
    return info


def _linears(params: dict, prefix: tuple = ()):
    """(path, array) of every float matmul weight in a tree."""
    for key, value in params.items():
        if isinstance(value, dict):
            yield from _linears(value, prefix + (key,))
        elif key in _WHERE or key == "lm_head":
            yield prefix + (key,), value


def _linear_bytes(qparams: dict) -> int:
    """Bytes of the quantized matmul weights' arrays (codes, scales, zeros; not embedding or norms)."""
    total = 0
    for key, value in qparams.items():
        if isinstance(value, dict):
            total += _linear_bytes(value)
        elif key.split("_")[0] in _WHERE or key.startswith("lm_head"):
            total += np.asarray(value).nbytes
    return total
