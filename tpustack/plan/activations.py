"""Activation bytes of one training step of tpustack.model.Decoder under a remat policy.

Counted from the block's code (model/layers.py, model/transformer.py): what reverse-mode
autodiff keeps per layer as residuals when nothing is rematerialised, and what
`nothing_saveable` keeps instead (only each layer's input, the scan carry), plus the
workspace of the one layer being differentiated and the LM head / loss at the end.
Per device: b is the local batch, heads / mlp / vocab are split `tensor` ways.
"""

from __future__ import annotations

from tpustack.config import ModelConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_residual_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1) -> float:
    """Bytes one block saves for its backward pass when nothing is rematerialised."""
    c = _BYTES[dtype]
    d, f = cfg.d_model, cfg.ffn_dim / tensor
    nh, kh = cfg.num_heads * cfg.heads_dim / tensor, cfg.num_kv_heads * cfg.heads_dim / tensor
    n = cfg.num_heads / tensor
    # x, norm(x), h = x + attn, norm(h): inputs of the residual adds and of the matmuls.
    model_dim = 4 * d
    # q, k, v after RoPE (inputs of the score and PV einsums) and the attention output
    # (input of the o projection).
    heads = 2 * nh + 2 * kh
    # gate, up and silu(gate) * up (input of the down projection).
    mlp = 3 * f
    # softmax probabilities [B, N, T, S]: f32 for the softmax gradient, plus the
    # compute-dtype copy the PV einsum reads when that differs.
    probs = n * t * (4 + (c if c < 4 else 0))
    return b * t * ((model_dim + heads + mlp) * c + probs)


def head_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1) -> float:
    """The LM head and loss: logits in the compute dtype and f32, and their f32 gradient."""
    c = _BYTES[dtype]
    v = cfg.vocab_size / tensor
    return b * t * v * (c + 4 + 4)


def activation_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1) -> float:
    """Peak activation bytes per device for remat 'none' or any policy that saves nothing."""
    c = _BYTES[dtype]
    per_layer = layer_residual_bytes(cfg, dtype, b, t, tensor)
    # While one layer is differentiated its residuals are live along with the f32
    # gradient of the attention scores, the largest transient of the backward pass.
    workspace = per_layer + b * (cfg.num_heads / tensor) * t * t * 4
    if remat == "none":
        saved = cfg.num_layers * per_layer
        workspace -= per_layer  # the last layer's residuals are already counted in `saved`
    else:  # nothing_saveable and friends: only each layer's input [B, T, D] survives
        saved = cfg.num_layers * b * t * cfg.d_model * c
    return saved + workspace + head_bytes(cfg, dtype, b, t, tensor)
