"""Training throughput on CPU: tpustack vs transformers' LlamaForCausalLM (PyTorch), side by side.

    python benchmarks/train_cpu.py [--repeats 5] [--config configs/bench_125m.py] [--batch 8 --seq 256]

Both train the configs/bench_125m shape (f32, AdamW) on the same random batch; steps are
interleaved (jax, torch, jax, torch, ...) so both see the same machine noise. Prints a
table with tokens/s, the ratio, and MFU against the f32 matmul peak measured in the same
run, then writes JSON to benchmarks/results/train_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_jax_step(config, batch_np):
    import jax

    from tpustack.mesh import make_mesh
    from tpustack.train.step import global_batch, make_trainer

    trainer = make_trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    batch = global_batch(batch_np, trainer.batch_sharding, batch_np["inputs"].shape[0])
    holder = {"state": state}

    def step() -> float:
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        return float(metrics["loss"])  # a host read: the step has finished
    return step


def make_torch_step(m, lr, batch_np, threads):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.ffn_dim,
                     num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
                     num_key_value_heads=m.num_kv_heads, rope_theta=m.rope_theta, rms_norm_eps=m.norm_eps,
                     tie_word_embeddings=m.tie_embeddings, max_position_embeddings=m.max_seq_len,
                     attn_implementation="sdpa")
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    inputs = torch.from_numpy(batch_np["inputs"]).long()
    targets = torch.from_numpy(batch_np["targets"]).long()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), targets.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)
    return step


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_125m.py"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_cpu.json"))
    args = parser.parse_args()

    import numpy as np

    from tpustack.config import load_config
    from tpustack.metrics import flops_per_token
    from tpustack.plan.chips import measure_cpu

    config = load_config(args.config, {"train.batch_size": str(args.batch), "train.seq_len": str(args.seq),
                                       "mesh.fsdp": "1", "train.precision": "f32"})
    m = config.model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

    chip = measure_cpu()
    steps = {"tpustack (jax)": make_jax_step(config, batch)}
    if not args.skip_torch:
        steps["transformers (torch)"] = make_torch_step(m, config.train.lr, batch, args.threads)
    for name, step in steps.items():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.repeats):
        for name, step in steps.items():
            times[name].append(timed(step))
        print(f"repeat {i + 1}/{args.repeats}: " +
              ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), file=sys.stderr, flush=True)
    # the peak again after the run, on the same noisy machine; the higher reading is the limit
    chip = max(chip, measure_cpu.__wrapped__(), key=lambda c: c.peak_flops)

    tokens_per_step = args.batch * args.seq
    flops_token = flops_per_token(m, args.seq)
    rows = []
    for name, ts in times.items():
        median = statistics.median(ts)
        tps = tokens_per_step / median
        rows.append({"name": name, "median_step_s": median, "tokens_per_s": tps,
                     "achieved_gflops": tps * flops_token / 1e9, "mfu": tps * flops_token / chip.peak_flops,
                     "step_times_s": ts})
    ref = rows[1]["tokens_per_s"] if len(rows) > 1 else None
    result = {
        "benchmark": "train_cpu", "config": os.path.basename(args.config), "params": m.num_params(),
        "batch": args.batch, "seq_len": args.seq, "dtype": "float32", "optimizer": "AdamW",
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads},
        "matmul_peak_gflops": chip.peak_flops / 1e9, "gemv_bandwidth_gbs": chip.hbm_bandwidth / 1e9,
        "flops_per_token": flops_token, "rows": rows,
        "ratio_vs_torch": rows[0]["tokens_per_s"] / ref if ref else None,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\ntrain step, {os.path.basename(args.config)} ({m.num_params() / 1e6:.1f}M params), "
          f"batch {args.batch} x {args.seq}, f32 AdamW, {cpu_name()} x {os.cpu_count()} cores")
    print(f"f32 matmul peak (measured): {chip.peak_flops / 1e9:.1f} GFLOP/s; "
          f"{flops_token / 1e6:.0f} MFLOP per token")
    print(f"{'implementation':<24}{'step (s)':>10}{'tokens/s':>10}{'GFLOP/s':>10}{'% peak':>8}{'vs torch':>10}")
    for r in rows:
        ratio = f"{r['tokens_per_s'] / ref:.2f}x" if ref else "-"
        print(f"{r['name']:<24}{r['median_step_s']:>10.2f}{r['tokens_per_s']:>10.1f}"
              f"{r['achieved_gflops']:>10.1f}{100 * r['mfu']:>7.1f}%{ratio:>10}")
    print(f"wrote {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
