"""QLoRA against 16-bit LoRA: the same adapters, data, seed and steps on a float base and on its
NF4 quantization, fine-tuned on text the base never saw; held-out loss and trainable state.

    python benchmarks/qlora.py [--checkpoint runs/small_12m] [--rank 4 --alpha 8 --steps 120]

Runs `tpustack finetune` (tpustack.compress.finetune) twice, --base-quant none and nf4, into
runs/qlora_bench/<quant> (resumable: rerun after an interruption and each picks up its last
checkpoint). The data is builtin-other (the stdlib's .txt/.rst/.html; the base trained on its
.py files), split by document. Improvement = held-out loss of the float base (no adapters)
minus held-out loss after the fine-tune, both on the same held-out batches; the goal is the
NF4 run's improvement >= 90% of the float run's (QLoRA paper: parity) with trainable state
(adapter params + Adam moments) <= 2% of a full fine-tune's (all params + Adam moments).
"16-bit" here is the unquantized f32 base: bf16 matmuls run slowly on CPU. Quality figures
only: no timing is reported. Writes benchmarks/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", default="runs/small_12m")
    parser.add_argument("--workdir", default="runs/qlora_bench")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-batches", type=int, default=16)
    parser.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0],
                        help="comma-separated seeds (adapter init and batches); losses are averaged over them")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "qlora.json"))
    args = parser.parse_args()

    from tpustack.checkpoint import Checkpointer
    from tpustack.compress.finetune import FinetuneOptions, finetune
    from tpustack.infer.serve_bench import machine  # the CPU model and cores, one definition

    ckpt = Checkpointer(args.checkpoint, read_only=True)
    base_step = ckpt.latest_step()
    ckpt.close()
    per_seed = []
    for seed in args.seeds:
        runs = {}
        for quant in ("none", "nf4"):
            opts = FinetuneOptions(
                checkpoint=args.checkpoint, workdir=os.path.join(args.workdir, f"{quant}_r{args.rank}_s{seed}"),
                rank=args.rank, alpha=args.alpha, base_quant=quant, steps=args.steps, batch_size=args.batch_size,
                seq_len=args.seq_len, lr=args.lr, warmup_steps=max(args.steps // 10, 1), seed=seed,
                eval_batches=args.eval_batches, save_every=20)
            runs[quant] = finetune(opts)
        per_seed.append(runs)
    runs = per_seed[0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    # each seed also draws its own held-out windows: every gain is against that seed's float base
    gains = [{q: r["none"]["heldout_loss_start"] - r[q]["heldout_loss_end"] for q in r} for r in per_seed]
    own_gains = [{q: r[q]["heldout_loss_start"] - r[q]["heldout_loss_end"] for q in r} for r in per_seed]
    gain = {q: mean([g[q] for g in gains]) for q in ("none", "nf4")}
    own_gain = {q: mean([g[q] for g in own_gains]) for q in ("none", "nf4")}
    share = gain["nf4"] / gain["none"]
    seed_shares = [g["nf4"] / g["none"] for g in gains]
    float_base = mean([r["none"]["heldout_loss_start"] for r in per_seed])
    nf4_base = mean([r["nf4"]["heldout_loss_start"] for r in per_seed])
    after = {q: mean([r[q]["heldout_loss_end"] for r in per_seed]) for q in ("none", "nf4")}
    state_share = runs["nf4"]["lora_trainable_bytes"] / runs["nf4"]["full_trainable_bytes"]
    result = {
        "cpu": machine(), "checkpoint": args.checkpoint, "base_step": base_step, "rank": args.rank,
        "alpha": args.alpha, "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "lr": args.lr, "seeds": args.seeds, "eval_batches": args.eval_batches,
        "data": "builtin-other (stdlib .txt/.rst/.html)",
        "heldout_loss": {"float_base": float_base, "nf4_base": nf4_base,
                         "lora_16bit": after["none"], "qlora_nf4": after["nf4"]},
        "heldout_loss_per_seed": [{"float_base": r["none"]["heldout_loss_start"],
                                   "nf4_base": r["nf4"]["heldout_loss_start"],
                                   **{q: r[q]["heldout_loss_end"] for q in r}} for r in per_seed],
        "improvement_vs_float_base": gain, "improvement_vs_own_base": own_gain,
        "qlora_share_of_lora_improvement": share, "share_per_seed": seed_shares,
        "trainable_state_bytes": runs["nf4"]["lora_trainable_bytes"],
        "full_finetune_state_bytes": runs["nf4"]["full_trainable_bytes"], "trainable_state_share": state_share,
        "adapter_params": runs["nf4"]["lora_params"], "model_params": runs["nf4"]["model_params"],
        "goals": {"qlora_share_at_least": 0.90, "trainable_state_share_at_most": 0.02,
                  "met": share >= 0.90 and state_share <= 0.02},
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    loss = result["heldout_loss"]
    print(f"\nQLoRA vs LoRA on {args.checkpoint} (step {base_step}), rank {args.rank}, alpha {args.alpha}, "
          f"{args.steps} steps x {args.batch_size} x {args.seq_len} bytes, seeds {args.seeds}, held-out nats/byte "
          f"of new text")
    print("| run | base loss | after | improvement vs float base | vs own base |\n|---|---|---|---|---|")
    print(f"| LoRA, f32 base | {float_base:.4f} | {loss['lora_16bit']:.4f} | {gain['none']:.4f} | "
          f"{own_gain['none']:.4f} |")
    print(f"| QLoRA, NF4 base | {loss['nf4_base']:.4f} | {loss['qlora_nf4']:.4f} | {gain['nf4']:.4f} | "
          f"{own_gain['nf4']:.4f} |")
    print(f"QLoRA improvement / LoRA improvement: {share:.1%} (goal >= 90%; per seed "
          f"{', '.join(f'{x:.1%}' for x in seed_shares)})")
    print(f"trainable state: {result['trainable_state_bytes'] / 2**20:.2f} MiB of a full fine-tune's "
          f"{result['full_finetune_state_bytes'] / 2**20:.1f} MiB = {state_share:.2%} (goal <= 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
