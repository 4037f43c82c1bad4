"""Activation bytes of one training step of tpustack.model.Decoder under a remat policy.

Counted from the block's code (model/layers.py, model/transformer.py) as XLA keeps it
(read off the buffer assignment of the compiled train step, tiny config on 8 CPU devices):
what reverse-mode autodiff stacks per layer as residuals when nothing is rematerialised,
what `nothing_saveable` keeps instead (only each layer's input, the scan carry), the
workspace of the one layer being differentiated, and the LM head / loss at the end.
Per device: b is the local batch, heads / mlp / vocab are split `tensor` ways.
"""

from __future__ import annotations

import dataclasses

from tpustack.config import ModelConfig

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def layer_residual_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1) -> float:
    """Activation bytes one block saves for its backward pass when nothing is rematerialised.

    Each term is a tensor of Attention / MLP / RMSNorm that the stacked residuals of the
    layer scan hold (one [L, ...] buffer each), per token:
    """
    c = _BYTES[dtype]
    d, f = cfg.d_model, cfg.ffn_dim / tensor
    nh, kh = cfg.num_heads * cfg.heads_dim / tensor, cfg.num_kv_heads * cfg.heads_dim / tensor
    n = cfg.num_heads / tensor
    # Each RMSNorm keeps its input x, the normalised x * rsqrt (for the scale's gradient)
    # and its output flattened to [B*T, D] (the input of the q/k/v or gate/up matmuls):
    # 3 [B, T, D] per norm, two norms per block.
    model_dim = 6 * d
    # q after RoPE and the 1/sqrt(H) scale, transposed to [B, K, G*T, H] (input of the
    # score einsum), the attention output [B*T, N*H] (input of the o projection), and k, v
    # transposed to [B, K, S, H] (inputs of the score and PV einsums).
    heads = 2 * nh + 2 * kh
    # gate, up, sigmoid(gate) and the logistic's (1 - sigmoid) for its derivative,
    # silu(gate), and silu(gate) * up flattened to [B*T, F] (input of the down projection).
    mlp = 6 * f
    # softmax output [B, K, G, T, S] in f32 (the softmax gradient) and its [B, K, G*T, S]
    # copy in the compute dtype that the PV einsum reads (a layout copy even under f32).
    probs = n * t * (4 + c)
    # f32 statistics: two rsqrt(mean(x^2)) [B, T, 1] per norm (forward and its derivative)
    # and the softmax's row max and row sum [B, N, T, 1].
    stats = 2 * 2 * 4 + 2 * n * 4
    return b * t * ((model_dim + heads + mlp) * c + probs + stats)


def head_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1) -> float:
    """The LM head and loss: logits in the compute dtype and f32, and their f32 gradient."""
    c = _BYTES[dtype]
    v = cfg.vocab_size / tensor
    return b * t * v * (c + 4 + 4)


def mlp_cotangent_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1) -> float:
    """The MLP backward's three [B, T, F] cotangents (of h, gate and up), live together."""
    return 3 * b * t * cfg.ffn_dim / tensor * _BYTES[dtype]


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes at the backward pass's peak, by what holds them."""

    saved: float  # residuals of every layer, kept from the forward pass to the backward pass
    workspace: float  # the one layer being differentiated (or the LM head, whichever is larger)
    pipeline: float = 0.0  # GPipe's [M, b, T, D] microbatch buffers and their cotangents

    @property
    def total(self) -> float:
        return self.saved + self.workspace + self.pipeline


def activations(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1,
                layer_weight_bytes: float = 0.0, saved_weight_bytes: float = 0.0,
                stages: int = 1, microbatches: int = 1) -> Activations:
    """Peak activation bytes per device for remat 'none' or any policy that saves nothing.

    layer_weight_bytes: one layer's weights in the compute dtype as the layer's matmuls read
    them (gathered over fsdp under ZeRO-3; sliced out of the stacked [L, ...] weights when
    scanned), live while that layer is differentiated. saved_weight_bytes: per layer, the
    weight-shaped residuals a scanned layer stacks (see memory.train_memory).

    stages > 1 (GPipe, model/transformer.py `gpipe`): b is the device's whole local batch;
    each of the M + S - 1 ticks runs this stage's L/S layers on one microbatch of b / M
    rows, and autodiff keeps every tick's residuals. The embedding, final norm, LM head and
    loss run on the whole local batch.
    """
    c = _BYTES[dtype]
    layers = cfg.num_layers
    mb = b
    pipeline = 0.0
    steps = layers  # layer applications whose residuals are all live at the backward's start
    if stages > 1:
        mb = -(-b // microbatches)
        steps = (microbatches + stages - 1) * (layers // stages)
        # x reshaped to [M, b, T, D] (the tick loop's feed) and out [M, b, T, D] (its
        # result), whose cotangents are live through the backward tick loop.
        pipeline = 2 * b * t * cfg.d_model * c
    per_layer = layer_residual_bytes(cfg, dtype, mb, t, tensor)
    if remat == "none":
        # Weight residuals are stacked once per layer: under GPipe the stage's weights are
        # the same in every tick, so the tick loop keeps them as loop constants.
        saved = steps * per_layer + (layers // stages) * saved_weight_bytes
        # The layer being differentiated copies its residuals (all but the [B, T, F] ones,
        # read in place) out of the stacked buffers, makes the MLP's three [B, T, F]
        # cotangents, and reads its weights.
        f_part = 6 * mb * t * cfg.ffn_dim / tensor * c
        layer_ws = per_layer - f_part + mlp_cotangent_bytes(cfg, dtype, mb, t, tensor) + layer_weight_bytes
    else:  # nothing_saveable and friends: only each layer's input [B, T, D] survives
        saved = steps * mb * t * cfg.d_model * c
        # The layer being differentiated first recomputes its forward: its residuals plus
        # the MLP cotangents and its weights are live, as without remat.
        layer_ws = per_layer + layer_weight_bytes
    workspace = max(layer_ws, head_bytes(cfg, dtype, b, t, tensor))
    return Activations(saved, workspace, pipeline)


def activation_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1, **kw) -> float:
    """Peak activation bytes per device (see `activations`)."""
    return activations(cfg, dtype, b, t, remat, tensor, **kw).total
