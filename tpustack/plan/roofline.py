"""Roofline (30.1): every op of a decode step or a training step with FLOPs, bytes, intensity.

achievable FLOP/s = min(P, I * B); an op takes max(FLOPs / P, bytes / B). The step time
is the sum over ops (no overlap between ops, no communication: a ceiling, not a promise).
A matmul [m, k] x [k, n] costs 2mkn FLOPs and moves its operands and result once.
Training counts the backward pass as two more matmuls of the same shape (dX and dW),
so 3x the forward FLOPs and bytes, with weights read in the compute dtype.

The *prediction* (`op_predicted`) charges the same counted FLOPs and bytes, but bytes at
the chip's cold-stream bandwidth for the size one kernel reads (a step streams each weight
once, so none is cached; small reads reach less of the bandwidth than large ones: measured
for "cpu", the datasheet HBM figure elsewhere) and adds the chip's fixed per-op latency
once per kernel an op needs (measured for "cpu", 0 elsewhere). Every term is a
counted byte or FLOP or a measured machine property; nothing is fitted to a benchmark.
"""

from __future__ import annotations

import dataclasses
import posixpath

import numpy as np

from tpustack import paths
from tpustack.config import ModelConfig
from tpustack.dtypes import itemsize
from tpustack.errors import UserError
from tpustack.plan.chips import Chip


@dataclasses.dataclass(frozen=True)
class Op:
    name: str
    kind: str  # matmul | attention | elementwise
    flops: float
    bytes: float
    count: int = 1  # how many times per step (layers)
    kernels: int = 1  # separately run ops per instance (each pays the chip's op_latency)

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes if self.bytes else float("inf")


def break_even(peak_flops: float, bandwidth: float) -> float:
    """The intensity where the memory wall meets the compute roof: P / B."""
    return peak_flops / bandwidth


def achievable(intensity: float, peak_flops: float, bandwidth: float) -> float:
    """min(P, I * B)."""
    return min(peak_flops, intensity * bandwidth)


def op_time(op: Op, chip: Chip) -> float:
    """Seconds for all `count` instances of op at the roofline."""
    return op.count * max(op.flops / chip.peak_flops, op.bytes / chip.hbm_bandwidth)


def op_stream_time(op: Op, chip: Chip) -> float:
    """The prediction without op latency: max(FLOPs / P, bytes / B_cold) for all `count`
    instances, B_cold the chip's cold-stream bandwidth at the bytes one kernel reads."""
    per_kernel = op.bytes / max(op.kernels, 1)
    return op.count * max(op.flops / chip.peak_flops, op.bytes / chip.cold_bandwidth(per_kernel))


def op_predicted(op: Op, chip: Chip) -> float:
    """Seconds for all `count` instances as predicted: the cold stream plus the fixed op
    latency once per kernel."""
    return op_stream_time(op, chip) + op.count * op.kernels * chip.op_latency


def bound(op: Op, chip: Chip) -> str:
    """'memory' below the break-even intensity, else 'compute'."""
    return "memory" if op.intensity < break_even(chip.peak_flops, chip.hbm_bandwidth) else "compute"


def _matmul(name: str, m: float, k: float, n: float, w_bytes: float, a_bytes: float, count: int,
            kernels: int = 1) -> Op:
    return Op(name, "matmul", 2 * m * k * n, k * n * w_bytes + (m * k + m * n) * a_bytes, count, kernels)


def decode_ops(cfg: ModelConfig, batch: int, context: int, weight_dtype: str = "bf16",
               kv_dtype: str = "bf16", act_dtype: str = "bf16", kv_copies: int = 0) -> list[Op]:
    """One decode step: `batch` new tokens attending to `context` cached positions each.

    `context` is the cache length attention reads (tpustack reads every slot of its
    bucketed cache, masking the unused ones). `kv_copies`: extra passes the attention
    makes over K and V, each a read and a write (the XLA path on CPU copies both into
    head-major layout every layer: 1; with the decode kernel (TPU / GPU): 0).
    `kernels` is the fewest separate ops each entry needs (one per matmul, one per fused
    elementwise group); XLA CPU runs more (see docs/benchmarks.md).
    """
    w, kv, a = itemsize(weight_dtype), itemsize(kv_dtype), itemsize(act_dtype)
    d, f, h, v = cfg.d_model, cfg.ffn_dim, cfg.heads_dim, cfg.vocab_size
    n, k, layers, m = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, batch
    kv_read = 2 * m * context * k * h * kv  # this layer's K and V for every sequence
    ops = [
        Op("embed lookup", "elementwise", 0, m * d * (w + a), 1),
        Op("rmsnorm x2", "elementwise", 2 * 4 * m * d, 2 * (2 * m * d * a + d * w), layers, 2),
        _matmul("q proj", m, d, n * h, w, a, layers),
        _matmul("k+v proj", m, d, 2 * k * h, w, a, layers, 2),
        Op("rope (q, k)", "elementwise", 3 * m * (n + k) * h, 2 * m * (n + k) * h * a, layers),
        Op("kv cache write", "elementwise", 0, 2 * m * k * h * (a + kv), layers, 2),
        Op("attention (QK, softmax, PV)", "attention", 4 * m * n * h * context + 5 * m * n * context,
           kv_read + 2 * m * n * h * a, layers, 3),
    ]
    if kv_copies:
        ops.append(Op("kv relayout (copy K, V)", "elementwise", 0, kv_copies * 2 * kv_read, layers, 2 * kv_copies))
    return ops + [
        _matmul("o proj", m, n * h, d, w, a, layers),
        Op("residual add x2", "elementwise", 2 * m * d, 2 * 3 * m * d * a, layers, 2),
        _matmul("mlp gate+up", m, d, 2 * f, w, a, layers, 2),
        Op("silu * up", "elementwise", 5 * m * f, 3 * m * f * a, layers),
        _matmul("mlp down", m, f, d, w, a, layers),
        Op("final rmsnorm", "elementwise", 4 * m * d, 2 * m * d * a + d * w, 1),
        _matmul("lm head", m, d, v, w, a, 1),
        Op("sampling (argmax)", "elementwise", m * v, m * v * 4, 1),
    ]


def train_ops(cfg: ModelConfig, batch: int, seq_len: int, dtype: str = "bf16") -> list[Op]:
    """One training step (forward + backward) on `batch` sequences of `seq_len` tokens."""
    c = itemsize(dtype)
    d, f, h = cfg.d_model, cfg.ffn_dim, cfg.heads_dim
    n, k, layers, t = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers, seq_len
    m = batch * t

    def mm(name, kk, nn, count):  # forward + dX + dW: three matmuls of the same size
        fwd = _matmul(name, m, kk, nn, c, c, count)
        return dataclasses.replace(fwd, flops=3 * fwd.flops, bytes=3 * fwd.bytes)

    # Scores and PV: 2 x 2 B N T T H forward (causal mask not discounted, as in metrics.py),
    # x3 with the backward; bytes: q, k, v, out, and the f32 scores/probs written and read.
    attn_flops = 3 * 4 * batch * n * t * t * h
    attn_bytes = 3 * (batch * t * (2 * n + 2 * k) * h * c + 2 * batch * n * t * t * 4)
    return [
        mm("q proj", d, n * h, layers),
        mm("k+v proj", d, 2 * k * h, layers),
        Op("attention (QK, softmax, PV)", "attention", attn_flops, attn_bytes, layers),
        mm("o proj", n * h, d, layers),
        mm("mlp gate+up", d, 2 * f, layers),
        Op("silu * up", "elementwise", 3 * 5 * m * f, 3 * 3 * m * f * c, layers),
        mm("mlp down", f, d, layers),
        Op("rmsnorm x2 + residual", "elementwise", 3 * 2 * 6 * m * d, 3 * 2 * 3 * m * d * c, layers),
        mm("lm head", d, cfg.vocab_size, 1),
        Op("cross-entropy", "elementwise", 3 * 5 * m * cfg.vocab_size, 3 * m * cfg.vocab_size * (c + 4), 1),
    ]


@dataclasses.dataclass(frozen=True)
class Prediction:
    ops: list[Op]
    seconds: float  # the roofline ceiling: every op at min(P, I x B)
    tokens: int
    model_flops: float  # the useful FLOPs of the step (for MFU)
    predicted_seconds: float = 0.0  # the prediction: cold-stream bandwidth plus per-op latency

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def predicted_tokens_per_s(self) -> float:
        return self.tokens / self.predicted_seconds

    def mfu(self, chip: Chip) -> float:
        """The MFU ceiling: useful FLOP/s at the roofline time over the chip's peak."""
        return self.model_flops / self.seconds / chip.peak_flops


def predict(ops: list[Op], chip: Chip, tokens: int) -> Prediction:
    """Sum the roofline times (and the predicted times) of ops; tokens is how many tokens the
    step produces."""
    seconds = sum(op_time(op, chip) for op in ops)
    flops = sum(op.flops * op.count for op in ops)
    return Prediction(ops, seconds, tokens, flops, sum(op_predicted(op, chip) for op in ops))


def plot(pred: Prediction, chip: Chip, path: str, title: str = "") -> None:
    """Write a log-log roofline PNG with each op placed at (intensity, achieved FLOP/s)."""
    # matplotlib is an optional extra (tpustack[plot]): imported here, where it is needed
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'tpustack[plot]'") from None
    matplotlib.use("Agg")  # before pyplot: no display on a server
    import matplotlib.pyplot as plt

    p, bw = chip.peak_flops, chip.hbm_bandwidth
    ridge = break_even(p, bw)
    xs = np.logspace(-1, max(4, np.log10(ridge) + 2), 200)
    fig, ax = plt.subplots(figsize=(11, 6))
    ax.loglog(xs, np.minimum(p, xs * bw), "k-", lw=2, label=f"{chip.name}: min(P, I x B)")
    ax.axvline(ridge, color="gray", ls=":", label=f"break-even {ridge:.0f} FLOP/byte")
    markers = {"matmul": "o", "attention": "s", "elementwise": "^"}
    for op in pred.ops:
        if op.flops <= 0:
            continue
        i = op.intensity  # ops overlap on the line, so they are named in the legend, not beside the point
        ax.scatter([i], [achievable(i, p, bw)], marker=markers[op.kind], s=60, zorder=3, alpha=0.8,
                   label=f"{op.name} ({i:.1f})")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achievable FLOP/s")
    ax.set_title(title or f"roofline on {chip.name}")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, title="op (FLOP/byte)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    with paths.open(path, "wb") as f:  # local or gs://; the format from the name, as savefig(path) does
        fig.savefig(f, format=posixpath.splitext(path)[1][1:].lower() or "png", dpi=110)
    plt.close(fig)
