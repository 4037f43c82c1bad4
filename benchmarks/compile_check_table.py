"""The compile-check table: full-size Llama configs compiled ahead of time for TPU topologies.

Nothing runs on a TPU: libtpu's virtual topologies compile the real sharded train step on
this CPU machine, and XLA's per-chip memory and FLOPs come back with the compile time.

    python benchmarks/compile_check_table.py [--out benchmarks/results/compile_check.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

from tpustack.machine import cpu_description

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# (config, topology, overrides): the layout we recommend for each (see docs/parallelism.md).
CASES = [
    ("configs/llama2_7b.py", "v5p:4x4x4", {"mesh.fsdp": "-1", "train.batch_size": "256"}),
    ("configs/llama2_13b.py", "v5p:4x4x4", {"mesh.fsdp": "-1", "train.batch_size": "256"}),
    # v5e has 16 GB per chip: one sequence per chip, and flash attention (the einsum path's
    # [B, N, T, T] scores at T=4096 alone are 2.7 GB per layer for 13B)
    ("configs/llama2_7b.py", "v5e:4x4", {"mesh.fsdp": "-1", "train.batch_size": "16",
                                         "model.attention_impl": "pallas"}),
    ("configs/llama2_13b.py", "v5e:4x4", {"mesh.fsdp": "-1", "train.batch_size": "16",
                                          "model.attention_impl": "pallas"}),
    # 13B's fp32 master + Adam alone is 9.8 GB per chip over 16 v5e chips: it needs 32
    ("configs/llama2_13b.py", "v5e:4x8", {"mesh.fsdp": "-1", "train.batch_size": "32",
                                          "model.attention_impl": "pallas"}),
]


def markdown(rows: list[dict]) -> str:
    out = ["| config | topology | layout | batch | attention | XLA GB/chip | estimate GB | err | HBM GB | fits "
           "| FLOPs/chip/step | compile s |", "|" + "---|" * 12]
    for r in rows:
        layout = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) + f", ZeRO-{r['zero_stage']}"
        attention = r["overrides"].get("model.attention_impl", "xla (einsum)")
        head = f"| {r['config']} | {r['topology']} | {layout} | {r['overrides']['train.batch_size']} | {attention} "
        if r["compiled"]:
            err = r["estimate_total_bytes"] / r["xla_total_bytes"] - 1
            out.append(head + f"| {r['xla_total_bytes'] / 1e9:.2f} | {r['estimate_total_bytes'] / 1e9:.2f} | {err:+.1%} "
                       f"| {r['hbm_bytes'] / 1e9:.1f} | yes | {r['flops_per_step_per_chip']:.3e} | {r['compile_s']} |")
        else:
            out.append(head + f"| > HBM (temporaries alone {r['xla_temp_bytes'] / 2**30:.2f} GiB) "
                       f"| {r['estimate_total_bytes'] / 1e9:.2f} | - | {r['hbm_bytes'] / 1e9:.1f} "
                       f"| **no** (RESOURCE_EXHAUSTED) | - | {r['compile_s']} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/compile_check.json")
    ap.add_argument("--only", default="", help="substring filter on 'config topology'")
    args = ap.parse_args()
    from tpustack.config import load_config
    from tpustack.train.aot import compile_check

    rows = []
    for path, topo, ov in CASES:
        if args.only and args.only not in f"{path} {topo}":
            continue
        t0 = time.perf_counter()
        r = compile_check(load_config(path, ov), topo)
        r["compile_s"] = round(time.perf_counter() - t0, 1)
        r["overrides"], r["machine"] = ov, cpu_description()  # the compile time is this CPU's
        rows.append(r)
        if not r["compiled"]:
            print(f"{r['config']:10s} {topo:10s} mesh {r['mesh']} does NOT fit: {r['xla_error']}  "
                  f"{r['compile_s']} s", flush=True)
            continue
        print(f"{r['config']:10s} {topo:10s} mesh {r['mesh']} XLA {r['xla_total_bytes'] / 1e9:6.2f} GB/chip "
              f"est {r['estimate_total_bytes'] / 1e9:6.2f} GB  HBM {r['hbm_bytes'] / 1e9:5.1f} GB "
              f"fits={r['fits']}  {r['flops_per_step_per_chip']:.3e} FLOPs/chip  {r['compile_s']} s", flush=True)
    print(markdown(rows))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
