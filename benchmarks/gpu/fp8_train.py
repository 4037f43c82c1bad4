"""train.precision=fp8 against bf16 on one GPU: train-step time, tokens/s, the loss of both,
and whether XLA turned the fp8 dots into fp8 GEMMs (cuBLASLt f8 custom calls in the HLO).

    python benchmarks/gpu/fp8_train.py --out DIR [--config configs/bench_125m.py] [--steps 20]

Same init, same batches for both precisions; medians of the step time after --warmup
steps, the two runs interleaved in blocks so drift hits both. Needs the full tpustack
(flax, optax, orbax, ml_collections) importable; run.sh calls it only when it is.
--dry-run: CPU, a tiny model, 3 steps; proves the script runs, not any figure.
Writes DIR/fp8_train.json; prints the ratio table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def _map_kernels() -> None:
    """Without an install (the GPU machines), load kernels/ as tpustack.kernels by hand."""
    import importlib.util

    try:
        import tpustack.kernels  # noqa: F401
        return
    except ImportError:
        pass
    init = os.path.join(ROOT, "kernels", "__init__.py")
    spec = importlib.util.spec_from_file_location("tpustack.kernels", init,
                                                  submodule_search_locations=[os.path.dirname(init)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tpustack.kernels"] = module
    spec.loader.exec_module(module)
    import tpustack

    tpustack.kernels = module


def make(config_path: str, precision: str, batch: int, seq: int, dry: bool):
    import jax

    from tpustack.config import load_config
    from tpustack.mesh import make_mesh
    from tpustack.train.step import Trainer

    overrides = {"train.precision": precision, "train.batch_size": str(batch), "train.seq_len": str(seq)}
    if dry:
        overrides.update({"model.d_model": "64", "model.num_layers": "2", "model.num_heads": "4",
                          "model.num_kv_heads": "2", "model.ffn_dim": "128", "model.vocab_size": "384"})
    config = load_config(config_path, overrides)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    return config, trainer, trainer.init(jax.random.key(0))


def fp8_gemms(trainer, batch: int, seq: int) -> dict:
    """Counts of GEMM custom calls in the compiled step: fp8 ones, and all."""
    hlo = trainer.lower_train_step(batch, seq).compile().as_text()
    calls = [line for line in hlo.splitlines() if "custom_call_target=\"__cublas" in line]
    return {"gemm_calls": len(calls), "fp8_gemm_calls": sum("f8e4m3" in c or "f8e5m2" in c for c in calls)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_125m.py"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    if args.dry_run:
        os.environ["JAX_PLATFORMS"] = "cpu"
        args.batch, args.seq, args.steps, args.warmup = 2, 32, 3, 1
    import jax
    import numpy as np

    _map_kernels()
    from tpustack.mesh import global_batch

    if not args.dry_run and jax.default_backend() != "gpu":
        print("fp8_train: no GPU (use --dry-run to test the script)", file=sys.stderr)
        return 2
    runs = {p: make(args.config, p, args.batch, args.seq, args.dry_run) for p in ("bf16", "fp8")}
    rng = np.random.default_rng(0)
    vocab = runs["bf16"][0].model.vocab_size
    batches = [rng.integers(0, vocab, (args.batch, args.seq + 1)).astype(np.int32) for _ in range(4)]
    result = {"device": str(jax.devices()[0]), "jax": jax.__version__, "config": args.config,
              "batch": args.batch, "seq": args.seq, "runs": {}}
    times: dict[str, list[float]] = {p: [] for p in runs}
    losses: dict[str, list[float]] = {p: [] for p in runs}
    states = {p: r[2] for p, r in runs.items()}
    for block in range(0, args.warmup + args.steps, 4):  # interleave blocks of 4 steps
        for p, (config, trainer, _) in runs.items():
            for step in range(block, min(block + 4, args.warmup + args.steps)):
                rows = batches[step % len(batches)]
                batch = global_batch({"inputs": rows[:, :-1], "targets": rows[:, 1:]}, trainer.batch_sharding,
                                     args.batch)
                t0 = time.perf_counter()
                states[p], metrics = trainer.train_step(states[p], batch)
                loss = float(metrics["loss"])  # waits for the step
                if step >= args.warmup:
                    times[p].append(time.perf_counter() - t0)
                losses[p].append(loss)
    for p, (config, trainer, _) in runs.items():
        step_s = statistics.median(times[p])
        result["runs"][p] = {"median_step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
                             "first_loss": losses[p][0], "last_loss": losses[p][-1],
                             **({} if args.dry_run else fp8_gemms(trainer, args.batch, args.seq))}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "fp8_train.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nfp8 vs bf16 train step, {result['device']}, jax {jax.__version__}, batch {args.batch} x {args.seq}")
    print("| precision | median step s | tokens/s | first loss | last loss | fp8 GEMMs / GEMMs |")
    print("|---|---|---|---|---|---|")
    for p, r in result["runs"].items():
        gemms = f"{r.get('fp8_gemm_calls', '-')} / {r.get('gemm_calls', '-')}"
        print(f"| {p} | {r['median_step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['first_loss']:.3f} | "
              f"{r['last_loss']:.3f} | {gemms} |")
    ratio = result["runs"]["bf16"]["median_step_s"] / result["runs"]["fp8"]["median_step_s"]
    print(f"fp8 speedup over bf16: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
