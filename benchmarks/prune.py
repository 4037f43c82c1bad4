"""Pruning quality on a trained model: held-out nats/byte, sparsity and parameters per method.

    python benchmarks/prune.py [--checkpoint runs/small_12m] [--recover-steps 100] [--decode]

Rows: the dense model; magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4; 25% of
the FFN channels removed (structured), before and after --recover-steps of fine-tuning, and
the dense model fine-tuned the same steps (the control: extra training helps it too).
Calibration: --calib held-out windows, seeded apart from the evaluation windows (the
training loop's eval batches, --eval-batches of them). The measured goal: the 2:4 loss
increase of Wanda or SparseGPT at most 25% of magnitude 2:4's.

--decode adds CPU decode tokens/s (batch 1, greedy, median of --repeats after a warm-up,
runs interleaved) of the structured rows against the dense model (goal: >= 1.15x). It is a
timing figure: run it on a quiet machine only; under load the ratio is void.
Writes benchmarks/results/prune_<name>.json and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from tpustack.machine import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

GOAL_24_SHARE = 0.25  # Wanda/SparseGPT 2:4 loss increase over magnitude 2:4's
GOAL_DECODE_RATIO = 1.15


def prune_rows(config, cfg, params, tokens, recover_steps: int, recover_lr: float, eval_batches: int,
               say=print) -> list[dict]:
    """One dict per row: name, sparsity, nats/byte, params (all, nonzero) and the pruned weights."""
    from tpustack.compress import prune, pruned, structured

    def row(name, row_cfg, row_params, **extra):
        t0 = time.perf_counter()
        loss = pruned.heldout_loss(pruned.with_model(config, row_cfg, ""), row_params, eval_batches)
        rep = prune.sparsity_report(row_cfg, row_params)
        say(f"{name}: {loss:.4f} nats/byte, {rep['linear_sparsity']:.1%} sparse ({time.perf_counter() - t0:.0f}s eval)")
        return {"name": name, "nats_per_byte": loss, "linear_sparsity": rep["linear_sparsity"],
                "params": rep["params"], "nonzero_params": rep["nonzero_params"], "cfg": row_cfg,
                "weights": row_params, **extra}

    rows = [row("dense", cfg, params)]
    for label, sparsity, pattern in (("50%", 0.5, None), ("2:4", None, (2, 4))):
        for method in prune.METHODS:
            t0 = time.perf_counter()
            out, masks = prune.prune_model(cfg, params, tokens, method, sparsity, pattern)
            extra = {"prune_s": time.perf_counter() - t0}
            if pattern:
                extra["packed_bits_per_weight"] = prune.packed_bits_per_weight(cfg, out)
            rows.append(row(f"{method} {label}", cfg, out, **extra))
    spec = structured.parse_structured("ffn=0.25")
    s_cfg, s_params, _ = structured.prune_structured(cfg, params, tokens, spec)
    rows.append(row("structured ffn 25%", s_cfg, s_params))
    if recover_steps:
        run_config = pruned.with_model(config, s_cfg, "")
        tuned, _ = pruned.recover(run_config, s_params, recover_steps, recover_lr)
        rows.append(row(f"structured ffn 25% + {recover_steps} steps", s_cfg, pruned.as_numpy(tuned)))
        tuned, _ = pruned.recover(pruned.with_model(config, cfg, ""), params, recover_steps, recover_lr)
        rows.append(row(f"dense + {recover_steps} steps (control)", cfg, pruned.as_numpy(tuned)))
    return rows


def decode_speeds(rows: list[dict], names: list[str], repeats: int, prompt_len: int, new_tokens: int) -> dict:
    """{row name: median decode tokens/s} at batch 1, greedy, the runs interleaved."""
    import numpy as np

    from tpustack.infer.bench import time_generation
    from tpustack.infer.decode import Generator

    gens = {r["name"]: Generator(r["cfg"], r["weights"]) for r in rows if r["name"] in names}
    prompt = [np.random.default_rng(0).integers(0, 256, prompt_len).tolist()]
    for gen in gens.values():
        time_generation(gen, prompt, new_tokens)  # compile and warm up
    times: dict[str, list[float]] = {n: [] for n in gens}
    for _ in range(repeats):
        for name, gen in gens.items():
            times[name].append(time_generation(gen, prompt, new_tokens)["decode_tokens_per_s"])
    return {name: statistics.median(v) for name, v in times.items()}


def decode_only(args) -> int:
    """Decode tokens/s of two checkpoints, interleaved (the structured row's timing without the table)."""

    from tpustack.weights import load_weights

    rows = []
    for name, path in zip(("dense", "pruned"), args.decode_only):
        cfg, params, _ = load_weights(path)
        rows.append({"name": name, "cfg": cfg, "weights": params, "path": path, "params": cfg.num_params()})
    speeds = decode_speeds(rows, ["dense", "pruned"], args.repeats, args.prompt_len, args.new_tokens)
    ratio = speeds["pruned"] / speeds["dense"]
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "repeats": args.repeats, "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "decode_tokens_per_s": speeds, "ratio": ratio,
              "rows": [{k: r[k] for k in ("name", "path", "params")} for r in rows]}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    for r in rows:
        print(f"{r['name']:7s} {r['path']}: {r['params'] / 1e6:.2f}M params, {speeds[r['name']]:.1f} decode tokens/s")
    print(f"pruned / dense decode tokens/s: {ratio:.2f}x (goal >= {GOAL_DECODE_RATIO}x); {result['cpu']}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.path.join(ROOT, "runs", "small_12m"))
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--eval-batches", type=int, default=0, help="0: the config's train.eval_batches")
    parser.add_argument("--recover-steps", type=int, default=100)
    parser.add_argument("--recover-lr", type=float, default=3e-4)
    parser.add_argument("--decode", action="store_true", help="time decode (quiet machine only)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/prune_<name>.json)")
    parser.add_argument("--decode-only", nargs=2, metavar=("DENSE", "PRUNED"),
                        help="skip the table: time decode of two saved checkpoints (e.g. `tpustack prune "
                             "--structured ffn=0.25`'s output against its source), interleaved")
    args = parser.parse_args()
    if args.decode_only:
        return decode_only(args)


    from tpustack.compress import pruned
    from tpustack.compress.sweep import calibration_tokens
    from tpustack.weights import load_weights, source_config

    cfg, params, _ = load_weights(args.checkpoint)
    config = source_config(args.checkpoint, cfg)
    params = pruned.as_numpy(params)
    tokens = calibration_tokens(config, args.calib, config.train.seq_len)
    eval_batches = args.eval_batches or config.train.eval_batches
    rows = prune_rows(config, cfg, params, tokens, args.recover_steps, args.recover_lr, eval_batches)
    dense = rows[0]["nats_per_byte"]
    by = {r["name"]: r for r in rows}
    mag = by["magnitude 2:4"]["nats_per_byte"] - dense
    shares = {m: (by[f"{m} 2:4"]["nats_per_byte"] - dense) / mag for m in ("wanda", "sparsegpt")}
    speeds = {}
    if args.decode:
        names = ["dense"] + [r["name"] for r in rows if r["name"].startswith("structured")][:1]
        speeds = decode_speeds(rows, names, args.repeats, args.prompt_len, args.new_tokens)
    result = {"cpu": cpu_model(), "cores": os.cpu_count(), "checkpoint": args.checkpoint, "calib_seqs": args.calib,
              "eval_batches": eval_batches, "eval_tokens": eval_batches * config.train.batch_size
              * config.train.seq_len, "recover_steps": args.recover_steps, "recover_lr": args.recover_lr,
              "rows": [{k: v for k, v in r.items() if k not in ("cfg", "weights")} for r in rows],
              "share_of_magnitude_24_increase": shares, "goal_share": GOAL_24_SHARE,
              "decode_tokens_per_s": speeds, "decode_timed_on_quiet_machine": bool(speeds)}
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"prune_{config.name}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\n{config.name} ({cfg.num_params() / 1e6:.1f}M params), {result['eval_tokens']} held-out bytes, "
          f"{result['cpu']}; JSON: {out}")
    print("| row | linear sparsity | nats/byte | vs dense | params | nonzero | decode tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = f"{speeds[r['name']]:.1f}" if r["name"] in speeds else "-"
        print(f"| {r['name']} | {r['linear_sparsity']:.1%} | {r['nats_per_byte']:.4f} | "
              f"{r['nats_per_byte'] - dense:+.4f} | {r['params']:,} | {r['nonzero_params']:,} | {speed} |")
    for m, share in shares.items():
        verdict = "undefined: magnitude 2:4 cost nothing" if mag <= 0 else (
            "met" if share <= GOAL_24_SHARE else "NOT met")
        print(f"{m} 2:4 loss increase / magnitude 2:4's: {share:.1%} (goal <= {GOAL_24_SHARE:.0%}): {verdict}")
    if speeds and len(speeds) > 1:
        name = next(n for n in speeds if n != "dense")
        print(f"decode {name} / dense: {speeds[name] / speeds['dense']:.2f}x (goal >= {GOAL_DECODE_RATIO}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
