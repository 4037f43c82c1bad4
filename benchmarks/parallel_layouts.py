"""Every parallel layout of the tiny model on 8 CPU devices: memory and collectives, measured vs modelled.

For each layout in tpustack.plan.layouts.LAYOUTS (data, fsdp with ZeRO 0-3, tensor, stage
and their mixes) the real train step is compiled once; from it come XLA's per-device bytes
(arguments + temporaries) beside tpustack.plan.memory's estimate, and the bytes each
collective moves per step read from the partitioned HLO (tpustack.plan.hlo) beside the
analytic expectation (tpustack.plan.comms).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/parallel_layouts.py
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

OVERRIDES = {"model.scan_layers": "True", "model.num_layers": "4", "train.batch_size": "16", "train.seq_len": "64"}


def measure(layout: str, remat: str = "none") -> dict:
    from tpustack.plan.comms import step_collective_bytes
    from tpustack.plan.hlo import collectives, summary
    from tpustack.plan.layouts import LAYOUTS, estimate_for, layout_config
    from tpustack.train.aot import compile_train_step_full, devices_for

    mesh, zero = LAYOUTS[layout]
    config = layout_config("configs/tiny.py", layout, remat, OVERRIDES)
    t0 = time.perf_counter()
    compiled = compile_train_step_full(config, devices_for("cpu"))
    seconds = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    t = config.train
    est = estimate_for(config, mesh, zero, "cpu")
    hlo = summary(collectives(compiled.as_text()))
    analytic = step_collective_bytes(config.model, mesh, zero, t.batch_size, t.seq_len, config.parallel.microbatches,
                                     repeats=config.parallel.pipeline_repeats)
    xla_bytes = float(stats.argument_size_in_bytes + stats.temp_size_in_bytes)
    return {"layout": layout, "mesh": mesh, "zero_stage": zero, "remat": remat, "compile_s": round(seconds, 1),
            "xla_bytes": xla_bytes, "estimate_bytes": est.total,
            "hlo_collectives": hlo, "hlo_moved_bytes": sum(v["moved_bytes"] for v in hlo.values()),
            "analytic_moved_bytes": sum(analytic.values()), "analytic_by_axis": analytic}


def markdown(rows: list[dict]) -> str:
    out = ["| layout | ZeRO | XLA MB/device | estimate MB | err | collectives in HLO (ops x runs/step) "
           "| HLO MB sent/device/step | analytic MB | err |", "|" + "---|" * 9]
    for r in rows:
        kinds = ", ".join(f"{k} {int(v['ops'])}x{int(v['runs'])}" for k, v in sorted(r["hlo_collectives"].items()))
        err = r["estimate_bytes"] / r["xla_bytes"] - 1
        h, a = r["hlo_moved_bytes"], r["analytic_moved_bytes"]
        cerr = f"{a / h - 1:+.0%}" if h else ("exact" if not a else "n/a")
        out.append(f"| {r['layout']} | {r['zero_stage']} | {r['xla_bytes'] / 1e6:.2f} | {r['estimate_bytes'] / 1e6:.2f} "
                   f"| {err:+.1%} | {kinds or '-'} | {h / 1e6:.3f} | {a / 1e6:.3f} | {cerr} |")
    return "\n".join(out)


def main() -> None:
    from tpustack.plan.layouts import LAYOUTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/parallel_layouts.json")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--only", default="", help="substring filter on layout names")
    args = ap.parse_args()
    rows = []
    for layout in (name for name in LAYOUTS if args.only in name):
        rows.append(measure(layout, args.remat))
        print(f"{layout}: {rows[-1]['compile_s']} s", flush=True)
    print(markdown(rows))
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
