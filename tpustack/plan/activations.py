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
from tpustack.dtypes import itemsize
from tpustack.plan.buffers import buffer_bytes
from tpustack.remat import PROJECTIONS, SAVED_PROJECTIONS


def matmul_operand_bytes(dtype: str, backend: str) -> int:
    """Bytes per element of a matmul operand as XLA keeps it.

    CPU multiplies in the compute dtype. TPU multiplies f32 at DEFAULT precision in bf16:
    XLA converts each f32 operand to bf16 and that bf16 copy is the value autodiff saves
    (read off the TPU buffer assignment: bf16[L, b*T, D], bf16[L, b, K, G*T, H], ... under
    an f32 model)."""
    return min(itemsize(dtype), 2) if backend == "tpu" else activation_elem_bytes(dtype, backend)


def activation_elem_bytes(dtype: str, backend: str) -> int:
    """Bytes per element of an activation in the compute dtype as XLA keeps it.

    XLA CPU has no bf16/fp16 arithmetic: it upcasts those elementwise ops and dots to f32,
    and the f32 results are what autodiff keeps (read off the CPU buffer assignment of
    llama_1b under bf16: f32[L, b, T, F], f32[L, b, K, G*T, S], ...). TPU computes in bf16."""
    return 4 if backend == "cpu" else itemsize(dtype)


def layer_residuals(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1,
                    backend: str = "cpu") -> list[tuple[str, tuple[int, ...], int]]:
    """The buffers one block saves for its backward pass when nothing is rematerialised:
    (what, per-device shape, bytes per element), each one [L, ...] stack of the layer scan.

    Read off XLA's buffer assignment (tiny on CPU and TPU, llama_1b on TPU), the same set on
    both; c is the compute dtype, m the matmul operand's (c on CPU, bf16 on TPU):
    """
    c, m = activation_elem_bytes(dtype, backend), matmul_operand_bytes(dtype, backend)
    d, f, h = cfg.d_model, -(-cfg.ffn_dim // tensor), cfg.heads_dim
    k = -(-cfg.num_kv_heads // tensor)
    g = cfg.num_heads // cfg.num_kv_heads
    return [
        # each RMSNorm's input (the block input x and h = x + attention) in c, its
        # normalised x * rsqrt in f32 (the scale's gradient), and its output flattened to
        # [B*T, D] as the q/k/v or gate/up matmuls read it (m).
        *[("norm input", (b, t, d), c)] * 2, *[("normalised", (b, t, d), 4)] * 2,
        *[("norm output", (b * t, d), m)] * 2,
        # q after RoPE and the 1/sqrt(H) scale as [B, K, G*T, H] (the score einsum's input),
        # k and v as [B, K, S, H], the attention output [B*T, N*H] (the o projection's input)
        ("q", (b, k, g * t, h), m), ("k", (b, k, t, h), m), ("v", (b, k, t, h), m),
        ("attention out", (b * t, k * g * h), m),
        # gate, up, sigmoid(gate), 1 - sigmoid (the logistic's derivative), silu(gate),
        # and silu(gate) * up flattened to [B*T, F] (the down projection's input, m)
        *[("mlp", (b, t, f), c)] * 5, ("mlp out", (b * t, f), m),
        # f32 statistics: two rsqrt(mean(x^2)) [B, T, 1] per norm (forward and its derivative)
        *[("norm stats", (b, t, 1), 4)] * 4,
    ] + ([
        # flash attention (tpustack.kernels, custom_vjp): the kernel keeps only the
        # log-sum-exp of each row, f32 [B, N, T]; probabilities live in VMEM tiles
        ("flash lse", (b, k * g, t), 4),
    ] if flash_attention(cfg, backend) else [
        # softmax output [B, K, G, T, S] in f32 (the softmax gradient) and its
        # [B, K, G*T, S] copy that the PV einsum reads (m; a layout copy even under f32 CPU),
        # and the softmax's row max and row sum [B, K, G, T, 1] in f32
        ("probs", (b, k, g, t, t), 4), ("probs (PV operand)", (b, k, g * t, t), m),
        *[("softmax stats", (b, k, g, t, 1), 4)] * 2,
    ])


# jax.checkpoint_policies that save matmul outputs: those with no batch dimensions (every
# dense projection here: model/layers.dense is a 2-D matmul), or every dot.
SAVES_DOTS = {"dots_with_no_batch_dims_saveable": False, "checkpoint_dots_with_no_batch_dims": False,
              "dots_saveable": True, "checkpoint_dots": True}


def saved_dots(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1,
               backend: str = "cpu") -> list[tuple[str, tuple[int, ...], int]]:
    """The matmul outputs a dots policy saves per layer (none for other policies), in the
    compute dtype: the q/k/v, gate and up projections [B*T, *] split over tensor, and the o
    and down projections [B*T, D] whole (the full sum the partitioner all-reduces); with
    `dots_saveable`, also the attention's batched einsums (f32 scores, PV output) unless
    flash attention hides them in the kernel. A named policy (tpustack.remat) saves the
    projections it names."""
    if remat not in SAVES_DOTS and remat not in SAVED_PROJECTIONS:
        return []
    c = activation_elem_bytes(dtype, backend)
    d, f, h = cfg.d_model, -(-cfg.ffn_dim // tensor), cfg.heads_dim
    k = -(-cfg.num_kv_heads // tensor)
    g = cfg.num_heads // cfg.num_kv_heads
    width = {"q": k * g * h, "k": k * h, "v": k * h, "o": d, "gate": f, "up": f, "down": d}
    # (a named policy saves a named value only where a backward op reads it: down's output
    # feeds only the residual sum, so it is never a residual; jax's dots policies save the
    # 2-D dot output itself, which the cotangent's reshape does read)
    names = [p for p in SAVED_PROJECTIONS[remat] if p != "down"] if remat in SAVED_PROJECTIONS else PROJECTIONS
    out = [(f"{p} proj", (b * t, width[p]), c) for p in names]
    if SAVES_DOTS.get(remat) and not flash_attention(cfg, backend):
        out += [("scores", (b, k, g * t, t), 4), ("pv", (b, k, g * t, h), c)]
    return out


def flash_attention(cfg: ModelConfig, backend: str) -> bool:
    """Whether the step's attention is the Pallas flash kernel (model/layers.use_kernels)."""
    return cfg.attention_impl == "pallas" or (cfg.attention_impl == "auto" and backend != "cpu")


def _sum(buffers, backend: str) -> float:
    return sum(buffer_bytes(shape, n, backend) for _, shape, n in buffers)


def layer_residual_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1,
                         backend: str = "cpu") -> float:
    """Activation bytes one block saves for its backward pass when nothing is rematerialised."""
    return _sum(layer_residuals(cfg, dtype, b, t, tensor, backend), backend)


def head_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1, backend: str = "cpu",
               dlogits: bool = False) -> float:
    """The LM head and loss: logits in the compute dtype and f32, and their f32 gradient (CPU).

    TPU keeps one [B*T, V] buffer in the compute dtype: XLA fuses the f32 upcast, the
    log-softmax's reductions and the loss into fusions that read the logits (only [B*T]
    f32 statistics are written), and the logits' gradient (softmax - onehot) is not written
    at all: both backward matmuls recompute it from the logits and the statistics inside
    their own fusions (read off sample #24's HLO, the head phase of
    benchmarks/estimate_vs_xla.py). Seen where the head is the step's peak: llama3_8b on
    v6e:4x4 at 1 x 8192 tokens per chip with flash attention (three [B*T, V] buffers
    estimated 23.66 GB against XLA's 16.76; issue 14) and a 256-wide 32000-vocab model at
    4 x 4096 per chip (5.40 GB against 1.39).

    dlogits: the weight gradient's matmul is a windowed (collective-matmul) loop
    (memory.collective_matmul), which cannot fuse its operand's producer, so the logits'
    gradient is written out as the loop's input: a second [B*T, V] buffer beside the logits
    (samples #37 and #40: bf16 logits and their gradient, both live at the peak)."""
    v = -(-cfg.vocab_size // tensor)
    if backend == "tpu":
        return (1 + dlogits) * buffer_bytes((b * t, v), activation_elem_bytes(dtype, backend), backend)
    return sum(buffer_bytes((b * t, v), n, backend) for n in (activation_elem_bytes(dtype, backend), 4, 4))


def mlp_cotangent_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1,
                        backend: str = "cpu") -> float:
    """The MLP backward's three [B, T, F] cotangents (of h, gate and up), live together."""
    return 3 * buffer_bytes((b, t, -(-cfg.ffn_dim // tensor)), activation_elem_bytes(dtype, backend), backend)


def probs_cotangent_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, tensor: int = 1,
                          backend: str = "cpu") -> float:
    """The attention backward's dP = dO V^T, [B, K, G*T, S] as the PV einsum's operand
    (none under flash attention, whose backward recomputes it tile by tile in VMEM)."""
    if flash_attention(cfg, backend):
        return 0.0
    k, g = -(-cfg.num_kv_heads // tensor), cfg.num_heads // cfg.num_kv_heads
    return buffer_bytes((b, k, g * t, t), matmul_operand_bytes(dtype, backend), backend)


@dataclasses.dataclass(frozen=True)
class Activations:
    """Activation bytes at the backward pass's peak, by what holds them."""

    saved: float  # residuals of every layer, kept from the forward pass to the backward pass
    workspace: float  # the one layer being differentiated (or the LM head, whichever is larger)
    pipeline: float = 0.0  # GPipe's [M, b, T, D] microbatch buffers and their cotangents
    head: float = 0.0  # the LM head's share of workspace (memory.train_memory times it on TPU)
    layer: float = 0.0  # the differentiated layer's share of workspace
    tick: float = 0.0  # a pipeline tick's residuals of its L/(S V) layers (remat none), sliced out per tick

    @property
    def total(self) -> float:
        return self.saved + self.workspace + self.pipeline


def activations(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1,
                layer_weight_bytes: float = 0.0, saved_weight_bytes: float = 0.0,
                stages: int = 1, microbatches: int = 1, backend: str = "cpu", repeats: int = 1,
                dlogits: bool = False, onchip: float = 0.0) -> Activations:
    """Peak activation bytes per device for remat 'none' or any policy that saves nothing.

    layer_weight_bytes: one layer's weights in the compute dtype as the layer's matmuls read
    them (gathered over fsdp under ZeRO-3; sliced out of the stacked [L, ...] weights when
    scanned), live while that layer is differentiated. saved_weight_bytes: per layer, the
    weight-shaped residuals a scanned layer stacks (see memory.train_memory).

    onchip: the chip's on-chip heap (chips.Chip.onchip_bytes; TPU): see the recomputed
    layer's probabilities below.

    stages > 1 (GPipe, model/transformer.py `gpipe`): b is the device's whole local batch;
    each of the M + S - 1 ticks runs this stage's L/S layers on one microbatch of b / M
    rows, and autodiff keeps every tick's residuals. The embedding, final norm, LM head and
    loss run on the whole local batch.
    """
    c = activation_elem_bytes(dtype, backend)
    layers = cfg.num_layers
    mb = b
    pipeline = 0.0
    steps = layers  # layer applications whose residuals are all live at the backward's start
    if stages > 1:
        mb = -(-b // microbatches)
        # V M + S - 1 ticks of L / (S V) layers each (V = 1: GPipe; V > 1: circular)
        steps = (repeats * microbatches + stages - 1) * (layers // (stages * repeats))
        # x reshaped to [M, b, T, D] (the tick loop's feed) and out [M, b, T, D] (its
        # result), whose cotangents are live through the backward tick loop.
        pipeline = 2 * buffer_bytes((b, t, cfg.d_model), c, backend)
    residuals = layer_residuals(cfg, dtype, mb, t, tensor, backend)
    per_layer = _sum(residuals, backend)
    if remat == "none":
        # Weight residuals are stacked once per layer: under GPipe the stage's weights are
        # the same in every tick, so the tick loop keeps them as loop constants.
        saved = steps * per_layer + (layers // stages) * saved_weight_bytes
        # The layer being differentiated copies its residuals (all but the [B, T, F] ones,
        # read in place) out of the stacked buffers, makes the MLP's three [B, T, F]
        # cotangents, and reads its weights.
        f_part = _sum([r for r in residuals if r[0].startswith("mlp")], backend)
        # (one layer on TPU: XLA's while-loop simplifier removes the trip-count-1 scan, so
        # the residuals are plain values the backward reads in place: nothing is copied)
        copied = 0.0 if backend == "tpu" and layers == 1 and stages == 1 else per_layer - f_part
        layer_ws = copied + mlp_cotangent_bytes(cfg, dtype, mb, t, tensor, backend) + layer_weight_bytes
        if backend == "tpu":
            layer_ws += probs_cotangent_bytes(cfg, dtype, mb, t, tensor, backend)
    else:  # nothing_saveable and friends: only each layer's input [B, T, D] survives,
        # and, under a dots policy, the matmul outputs it names (saved_dots). Inside the
        # pipeline the layers run under the vmap over stages (and batch shards), which gives
        # every projection a batch dimension: `dots_with_no_batch_dims_saveable` then saves
        # none of them (samples #7, #34, #68 of benchmarks/estimate_vs_xla.py: the tick
        # loop's only stacked residual is the layers' inputs).
        # (named outputs keep their names under the vmap: a named policy saves them there too)
        dots = (saved_dots(cfg, dtype, mb, t, remat, tensor, backend)
                if stages == 1 or SAVES_DOTS.get(remat) or remat in SAVED_PROJECTIONS else [])
        saved = steps * (buffer_bytes((mb, t, cfg.d_model), c, backend) + _sum(dots, backend))
        # The layer being differentiated first recomputes its forward: its residuals and
        # its weights are live. On TPU its backward's peak also holds the MLP's three
        # [B, T, F] cotangents and the probabilities' cotangent dP = dO V^T beside the
        # recomputed residuals: llama2_7b on v5p:4x4x4 (b=4) at T=2048 and 4096 is short of
        # XLA by a*T^2 + b*T with a = one bf16 [b, N, T, S] and b ~ three bf16 [b, T, F].
        # XLA CPU's peak comes before they exist (tiny's CPU rows hold without them).
        layer_ws = per_layer + layer_weight_bytes
        if backend == "tpu":
            layer_ws += (mlp_cotangent_bytes(cfg, dtype, mb, t, tensor, backend)
                         + probs_cotangent_bytes(cfg, dtype, mb, t, tensor, backend))
            # The recomputed probabilities' [B, K, G*T, S] copy that the PV einsum reads is one
            # whole buffer, made and read inside the layer's backward: XLA's memory-space
            # assignment places it in VMEM when it fits the chip's on-chip heap (a fresh compile
            # of #15's kind, q15 on v5e: bf16 [2, 8192, 2048], 67 MB, in memory space 1 at the
            # HBM heap's peak beside the f32 probabilities in HBM; 268 MB at 4096 tokens, q15t4,
            # stays in HBM).
            pv = [r for r in residuals if r[0] == "probs (PV operand)"]
            if pv and _sum(pv, backend) <= onchip:
                layer_ws -= _sum(pv, backend)
    if stages > 1 and backend == "tpu":
        # the tick's select of stage 0's input (a new microbatch or the passed activation)
        # keeps its [b, T, D] predicate per tick for the backward pass (pred[ticks, b, T, D])
        saved += (repeats * microbatches + stages - 1) * buffer_bytes((mb, t, cfg.d_model), 1, backend)
    head = head_bytes(cfg, dtype, b, t, tensor, backend, dlogits)
    tick = (layers // (stages * repeats)) * per_layer if stages > 1 and remat == "none" else 0.0
    return Activations(saved, max(layer_ws, head), pipeline, head, layer_ws, tick)


def activation_bytes(cfg: ModelConfig, dtype: str, b: int, t: int, remat: str, tensor: int = 1, **kw) -> float:
    """Peak activation bytes per device (see `activations`)."""
    return activations(cfg, dtype, b, t, remat, tensor, **kw).total
