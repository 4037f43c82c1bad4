"""The compression quality table: held-out nats/byte and measured bytes per weight of each
quantization of one trained model (issue 12, items 1-2).

    python benchmarks/compression.py [--checkpoint runs/small_12m] [--calib 128] [--rows f32,int8,...]
                                     [--eval-batches N] [--keep]

Each row quantizes the checkpoint with `tpustack quantize`'s driver into runs/compression/<row>
(codes and scales as saved), reads it back through load_weights and evaluates it through the
model's quantized matmul path (model.weight_quant), every row on the same held-out tokens: by
default the whole held-out stream in back-to-back windows, less those that overlap a
calibration window (calibration.heldout_tiles); with --eval-batches N, the first N batches
`tpustack eval` reads. Per-window losses give each row's standard error against f32 (paired:
the same windows) and a bootstrap 95% interval (2,000 resamples of windows) for each
"gap closed"; they are kept in <out-root>/window_nats.npz, so --keep can rerun some rows and
keep the others of the last run on the same tokens. Bytes per weight: the saved arrays of
the matmul weights (codes + scales + zero points / NF4 absmax codes) over their parameter count
(embedding and norms stay f32 in every row and are counted apart). The model is byte-level,
so nats per token are nats per byte. Quality figures only: the GPTQ time is printed for the
"within 5 minutes" goal and is only meaningful on a quiet machine.

Rows are a registry: `@row("name")` on a function (ctx) -> dict adds one; other compression
methods (pruning, QLoRA) register theirs the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import time
from typing import Callable

from tpustack.machine import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROWS: dict[str, Callable] = {}


def row(name: str):
    """Register a table row: fn(ctx) -> {"nats_per_byte", "bytes_per_weight", ...}."""
    def wrap(fn):
        ROWS[name] = fn
        return fn
    return wrap


class Context:
    """The source checkpoint, its config and held-out batches, and an evaluator shared by the rows."""

    def __init__(self, checkpoint: str, out_root: str, calib: int, eval_batches: int | None):
        import numpy as np

        from tpustack.compress.calibration import heldout_tiles
        from tpustack.compress.quantize import source_config
        from tpustack.data import Batcher, load_tokenizer, load_tokens
        from tpustack.weights import load_weights

        self.checkpoint, self.out_root, self.calib = checkpoint, out_root, calib
        self.cfg, self.params, _ = load_weights(checkpoint)
        self.config = source_config(checkpoint, self.cfg)
        t = self.config.train
        if eval_batches:
            tokens = load_tokens(self.config.data, load_tokenizer(self.config.data.tokenizer))["heldout"]
            batcher = Batcher(tokens, t.batch_size, t.seq_len, t.seed, "heldout")
            self.batches = [batcher.host_batch(i) for i in range(eval_batches)]
            self.eval_set = f"the first {eval_batches} batches of tpustack eval"
        else:
            tiles = heldout_tiles(self.config, calib)
            self.batches = [{"inputs": tiles[i:i + 64, :-1], "targets": tiles[i:i + 64, 1:]}
                            for i in range(0, len(tiles), 64)]
            self.eval_set = (f"the whole held-out stream in {len(tiles)} windows of {t.seq_len + 1} "
                             f"(those overlapping the {calib} calibration windows left out)")
        self.windows: dict[str, np.ndarray] = {}  # row -> per-window mean nats per token

    def loss(self, cfg, params, name: str | None = None) -> float:
        """Mean held-out nats per token over the windows (all of equal length); kept per window as `name`."""
        import jax
        import numpy as np

        from tpustack.model import Decoder
        from tpustack.model.transformer import cross_entropy

        def per_window(p, batch):
            logits = Decoder(cfg).apply({"params": p}, batch["inputs"])
            return jax.vmap(lambda lg, tg: cross_entropy(lg[None], tg[None])[0])(logits, batch["targets"])
        step = jax.jit(per_window)
        nats = np.concatenate([np.asarray(step(params, b)) for b in self.batches]) / self.batches[0]["targets"].shape[1]
        if name:
            self.windows[name] = nats
        return float(nats.mean())

    def quantized_row(self, name: str, method: str, bits: int = 4, group: int = 128, **kw) -> dict:
        """Quantize into out_root/name, load it back, evaluate: the row's figures."""
        from tpustack.compress.quantize import quantize_checkpoint
        from tpustack.weights import load_weights

        out = os.path.join(self.out_root, name)
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        info = quantize_checkpoint(self.checkpoint, out, method, bits, group, self.calib, **kw)
        seconds = time.perf_counter() - t0
        cfg, params, _ = load_weights(out)
        return {"nats_per_byte": self.loss(cfg, params, name), "bytes_per_weight": info["matmul_bytes_per_weight"],
                "file_bytes": os.path.getsize(os.path.join(out, "params.safetensors")),
                "quantize_s": seconds, "weight_quant": cfg.weight_quant, "dir": out,
                **{k: info[k] for k in ("bits", "group", "calib_tokens") if k in info}}


@row("f32")
def f32_row(ctx: Context) -> dict:
    return {"nats_per_byte": ctx.loss(ctx.cfg, ctx.params, "f32"), "bytes_per_weight": 4.0, "weight_quant": "none"}


# The quantized rows: name -> quantize_checkpoint's (method, bits, keyword arguments).
QUANTIZED_ROWS = {
    "int8": ("int8", 4, {}),
    "rtn4_g128": ("rtn", 4, {}),
    "gptq4_g128": ("gptq", 4, {}),
    "awq4_g128": ("awq", 4, {}),
    "awq4_clip_g128": ("awq", 4, {"awq_clip": True}),  # with the paper's weight-clipping search
    "nf4": ("nf4", 4, {}),
    "rtn3_g128": ("rtn", 3, {}),
    "gptq3_g128": ("gptq", 3, {}),
}


def quantized_row(ctx: Context, name: str) -> dict:
    method, bits, kw = QUANTIZED_ROWS[name]
    return ctx.quantized_row(name, method, bits, **kw)


for _name in QUANTIZED_ROWS:
    row(_name)(functools.partial(quantized_row, name=_name))


# Pruned rows (tpustack prune, issue 12 item 4). benchmarks/prune.py has the whole pruning table
# (50% unstructured rows, a dense control for the fine-tune, decode tokens/s on a quiet machine).
PRUNE_RECOVER_STEPS = 60
PRUNE_RECOVER_LR = 3e-4


def pruned_2of4_row(ctx: Context, method: str) -> dict:
    """2:4 sparsity by `method`; bytes per weight as packed (f32 values + 2-bit positions)."""
    from tpustack.compress import prune, pruned
    from tpustack.compress.sweep import calibration_tokens

    tokens = calibration_tokens(ctx.config, ctx.calib, ctx.config.train.seq_len)
    params, _ = prune.prune_model(ctx.cfg, pruned.as_numpy(ctx.params), tokens, method, pattern=(2, 4))
    return {"nats_per_byte": ctx.loss(ctx.cfg, params, f"{method}_2of4"), "bytes_per_weight": prune.packed_bits_per_weight(ctx.cfg, params) / 8,
            **prune.sparsity_report(ctx.cfg, params)}


for _method in ("magnitude", "wanda", "sparsegpt"):
    row(f"{_method}_2of4")(functools.partial(pruned_2of4_row, method=_method))


@row("structured_ffn25")
def structured_ffn25_row(ctx: Context) -> dict:
    """25% of the FFN channels removed per block, then PRUNE_RECOVER_STEPS of fine-tuning."""
    from tpustack.compress import pruned, structured
    from tpustack.compress.sweep import calibration_tokens

    tokens = calibration_tokens(ctx.config, ctx.calib, ctx.config.train.seq_len)
    cfg, params, _ = structured.prune_structured(ctx.cfg, pruned.as_numpy(ctx.params), tokens,
                                                 structured.parse_structured("ffn=0.25"))
    before = ctx.loss(cfg, params)
    tuned, _ = pruned.recover(pruned.with_model(ctx.config, cfg, ""), params, PRUNE_RECOVER_STEPS, PRUNE_RECOVER_LR)
    return {"nats_per_byte": ctx.loss(cfg, tuned, "structured_ffn25"), "nats_per_byte_before_recovery": before,
            "recover_steps": PRUNE_RECOVER_STEPS, "bytes_per_weight": 4.0, "params": cfg.num_params()}


def gap_closed_interval(windows: dict, method: str, rtn: str, resamples: int = 2000) -> list[float] | None:
    """Bootstrap 95% interval of (rtn - method) / (rtn - f32) over resampled windows (paired)."""
    import numpy as np

    if not {method, rtn, "f32"} <= windows.keys():
        return None
    idx = np.random.default_rng(0).integers(0, len(windows["f32"]), (resamples, len(windows["f32"])))
    m, r, f = (windows[k][idx].mean(axis=1) for k in (method, rtn, "f32"))
    return [float(v) for v in np.percentile((r - m) / (r - f), [2.5, 97.5])]


def paired_se(windows: dict, row: str, base: str = "f32") -> float | None:
    """Standard error of mean(row) - mean(base) over the same windows."""
    if not {row, base} <= windows.keys():
        return None
    d = windows[row] - windows[base]
    return float(d.std(ddof=1) / len(d) ** 0.5)


def goals(rows: dict[str, dict], windows: dict | None = None) -> list[tuple[str, str, str, bool | None]]:
    """(metric, measured, goal, met) for the issue's measured goals this table can answer."""
    loss = {k: v["nats_per_byte"] for k, v in rows.items()}
    windows = windows or {}
    out = []

    def closed(method: str, rtn: str) -> float | None:
        if {method, rtn, "f32"} <= loss.keys() and loss[rtn] != loss["f32"]:
            return (loss[rtn] - loss[method]) / (loss[rtn] - loss["f32"])
        return None
    if {"int8", "f32"} <= loss.keys():
        inc = (loss["int8"] - loss["f32"]) / loss["f32"]
        out.append(("int8 loss increase", f"{100 * inc:.3f}%", "<= 0.5%", inc <= 0.005))
    for method, rtn, goal in (("gptq4_g128", "rtn4_g128", 0.40), ("awq4_g128", "rtn4_g128", 0.50),
                              ("awq4_clip_g128", "rtn4_g128", 0.50), ("gptq3_g128", "rtn3_g128", 0.60)):
        c = closed(method, rtn)
        if c is not None:
            ci = gap_closed_interval(windows, method, rtn)
            measured = f"{100 * c:.1f}%" + (f" (95% CI {100 * ci[0]:.0f}% to {100 * ci[1]:.0f}%)" if ci else "")
            out.append((f"{method}: share of {rtn}'s gap closed", measured, f">= {100 * goal:.0f}%", c >= goal))
    if {"magnitude_2of4", "f32"} <= loss.keys() and loss["magnitude_2of4"] > loss["f32"]:
        for method in ("wanda_2of4", "sparsegpt_2of4"):
            if method in loss:
                share = (loss[method] - loss["f32"]) / (loss["magnitude_2of4"] - loss["f32"])
                out.append((f"{method} loss increase, share of magnitude 2:4's", f"{100 * share:.1f}%", "<= 25%",
                            share <= 0.25))
    if "nf4" in rows:
        bits = 8 * rows["nf4"]["bytes_per_weight"]
        out.append(("NF4 storage", f"{bits:.4f} bits/param", "4.127 +- 0.01", abs(bits - 4.127) <= 0.01))
    if "gptq4_g128" in rows:
        s = rows["gptq4_g128"]["quantize_s"]
        out.append(("GPTQ 4-bit time (load + calibrate + quantize + write)", f"{s:.0f} s", "<= 300 s", s <= 300))
    return out


def write_json(args, ctx: Context, rows: dict[str, dict]) -> dict:
    """The rows so far and the goals they answer, to --json."""
    for name, r in rows.items():
        se = paired_se(ctx.windows, name)
        if se is not None and name != "f32":
            r["se_vs_f32"] = se
    result = {"machine": f"{cpu_model()} x {os.cpu_count()}", "checkpoint": args.checkpoint, "params": ctx.cfg.num_params(),
              "eval_tokens": sum(b["targets"].size for b in ctx.batches), "eval_set": ctx.eval_set,
              "eval_windows": sum(len(b["targets"]) for b in ctx.batches), "calib_sequences": args.calib,
              "command": "python benchmarks/compression.py " + " ".join(sys.argv[1:]),
              "rows": rows,
              "goals": [dict(zip(("metric", "measured", "goal", "met"), g)) for g in goals(rows, ctx.windows)]}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/small_12m")
    parser.add_argument("--out-root", default="runs/compression", help="where each row's quantized dir goes")
    parser.add_argument("--calib", type=int, default=128, help="calibration sequences (GPTQ, AWQ)")
    parser.add_argument("--eval-batches", type=int, default=0,
                        help="N: tpustack eval's first N batches; 0: the whole held-out stream less calibration")
    parser.add_argument("--keep", action="store_true",
                        help="keep the other rows of the last run's JSON (same checkpoint, calib and tokens)")
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated rows to run")
    parser.add_argument("--json", default=os.path.join(ROOT, "benchmarks", "results", "compression.json"))
    args = parser.parse_args()
    ctx = Context(args.checkpoint, args.out_root, args.calib, args.eval_batches or None)
    rows: dict[str, dict] = {}
    npz = os.path.join(args.out_root, "window_nats.npz")
    if args.keep and os.path.exists(args.json) and os.path.exists(npz):
        import numpy as np

        with open(args.json) as f:
            last = json.load(f)
        if (last.get("checkpoint"), last.get("calib_sequences"), last.get("eval_set")) == (
                args.checkpoint, args.calib, ctx.eval_set):
            rows.update(last["rows"])
            ctx.windows.update(dict(np.load(npz)))
    for name in args.rows.split(","):
        rows[name] = ROWS[name](ctx)
        if ctx.windows:
            import numpy as np

            os.makedirs(args.out_root, exist_ok=True)
            np.savez(npz, **ctx.windows)
        print(f"{name}: {rows[name]['nats_per_byte']:.6f} nats/byte, "
              f"{rows[name]['bytes_per_weight']:.4f} bytes/weight", flush=True)
        result = write_json(args, ctx, rows)  # after every row: a long run keeps what it measured
    met = goals(rows, ctx.windows)
    print(f"\n{ctx.cfg.num_params() / 1e6:.1f}M params, {result['eval_tokens']} held-out bytes, {cpu_model()}")
    print(f"{'row':<16} {'nats/byte':>10} {'- f32':>10} {'(se)':>9} {'bytes/weight':>13} {'bits/weight':>12}")
    base = rows.get("f32", {}).get("nats_per_byte")
    for name, r in rows.items():
        delta = f"{r['nats_per_byte'] - base:+.6f}" if base else ""
        se = f"({r['se_vs_f32']:.6f})" if "se_vs_f32" in r else ""
        print(f"{name:<16} {r['nats_per_byte']:>10.6f} {delta:>10} {se:>9} {r['bytes_per_weight']:>13.4f} "
              f"{8 * r['bytes_per_weight']:>12.3f}")
    print()
    for metric, measured, goal, ok in met:
        print(f"{metric}: {measured} (goal {goal}) {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
