"""Where a CPU train step's time goes: forward vs forward+backward vs full step, and per-HLO-op time.

    python benchmarks/profile_train_cpu.py [--config configs/bench_125m.py] [--batch 8 --seq 256]
        [--hlo /tmp/train_step.hlo] [--trace /tmp/trace] [--top 40]

Times the jitted eval (forward + loss), loss_and_grads (forward + backward) and train_step
(+ clip, AdamW) of the same trainer, writes the optimized HLO of the train step, then traces
one train step with the jax profiler and prints the ops that took the most time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def op_times(trace_dir: str) -> dict[str, list[float]]:
    """Per-event durations (s) from the newest .xplane.pb under trace_dir, keyed by event name."""
    from jax.profiler import ProfileData

    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    data = ProfileData.from_file(path)
    out: dict[str, list[float]] = collections.defaultdict(list)
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU") and "cpu" not in plane.name.lower():
            continue
        for line in plane.lines:
            for event in line.events:
                out[f"{line.name}|{event.name}"].append(event.duration_ns / 1e9)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_125m.py"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--hlo", default="/tmp/train_step.hlo")
    parser.add_argument("--trace", default="/tmp/trace")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--skip", default="", help="comma list of eval,grads,step,trace to skip")
    args = parser.parse_args()
    skip = set(args.skip.split(","))

    import jax
    import numpy as np

    from tpustack.config import load_config
    from tpustack.mesh import make_mesh
    from tpustack.train.step import global_batch, make_trainer

    config = load_config(args.config, {"train.batch_size": str(args.batch), "train.seq_len": str(args.seq),
                                       "mesh.fsdp": "1", "train.precision": "f32"})
    m = config.model
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, m.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    trainer = make_trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init(jax.random.key(0))
    batch = global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}, trainer.batch_sharding, args.batch)

    rows = []
    if "eval" not in skip:
        trainer.eval_step(state.params, batch)["loss_sum"].block_until_ready()
        rows.append(("forward + loss", median_time(
            lambda: trainer.eval_step(state.params, batch)["loss_sum"].block_until_ready(), args.repeats)))
    if "grads" not in skip:
        trainer.loss_and_grads(state.params, batch)[0].block_until_ready()
        rows.append(("forward + backward", median_time(
            lambda: jax.block_until_ready(trainer.loss_and_grads(state.params, batch)), args.repeats)))
    holder = {"state": state}

    def step():
        holder["state"], metrics = trainer.train_step(holder["state"], batch)
        return float(metrics["loss"])

    step()
    if "step" not in skip:
        rows.append(("train step", median_time(step, args.repeats)))
    for name, t in rows:
        print(f"{name:<22}{t:8.2f} s  {args.batch * args.seq / t:8.1f} tokens/s", flush=True)
    if args.hlo:
        compiled = trainer.lower_train_step(args.batch, args.seq).compile()
        with open(args.hlo, "w") as f:
            f.write(compiled.as_text())
        print(f"wrote {args.hlo}")

    if "trace" in skip:
        return
    with jax.profiler.trace(args.trace):
        step()
    times = op_times(args.trace)
    total = collections.Counter({k: sum(v) for k, v in times.items()})
    print(f"\n{'op (line|event)':<90}{'calls':>6}{'total s':>9}")
    for name, t in total.most_common(args.top):
        print(f"{name[:90]:<90}{len(times[name]):>6}{t:>9.3f}")


if __name__ == "__main__":
    main()
