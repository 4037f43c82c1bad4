"""train.precision=fp8 against bf16 on one GPU: train-step time, tokens/s, the loss of both,
and whether XLA turned the fp8 dots into fp8 GEMMs (cuBLASLt f8 custom calls in the HLO).

    python benchmarks/gpu/fp8_train.py --out DIR [--config configs/bench_125m.py] [--steps 20]
        [--set model.num_layers=4 ...] [--precisions bf16,fp8] [--dot-out f32|bf16] [--tag NAME]

Same init, same batches for both precisions; medians of the step time after --warmup
steps, the two runs interleaved in blocks so drift hits both. Needs the full tpustack
(flax, optax, orbax, ml_collections) importable; run.sh calls it only when it is.
--dot-out bf16 is an experiment: the fp8 dots return the compute dtype (flax's fp8_ops do
this) instead of f32, to see which form XLA's GPU GEMM rewriter turns into fp8 GEMMs.
--dry-run: CPU, a tiny model, 3 steps; proves the script runs, not any figure.
Writes DIR/fp8_train[_TAG].json and the fp8 step's compiled HLO (gzipped) beside it; prints
the ratio table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
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


def make(config_path: str, precision: str, batch: int, seq: int, dry: bool, sets: dict):
    import jax

    from tpustack.config import load_config
    from tpustack.mesh import make_mesh
    from tpustack.train.step import Trainer

    overrides = {**sets, "train.precision": precision, "train.batch_size": str(batch), "train.seq_len": str(seq)}
    if dry:
        overrides.update({"model.d_model": "64", "model.num_layers": "2", "model.num_heads": "4",
                          "model.num_kv_heads": "2", "model.ffn_dim": "128", "model.vocab_size": "384"})
    config = load_config(config_path, overrides)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, attention_impl="xla"))
    trainer = Trainer(config, make_mesh(config.mesh, jax.devices()[:1]))
    return config, trainer, trainer.init(jax.random.key(0))


F8 = ("f8e4m3", "f8e5m2")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+) = \(?(\w+)\[")
_OPERANDS = re.compile(r" (?:dot|custom-call)\(([^)]*)\)")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+) ")


def hlo_census(hlo: str) -> dict:
    """Where the compiled step's matmuls went. Compiled HLO names operands without their types,
    so each instruction's dtype is looked up by name: cuBLAS custom calls (all, and those with
    fp8 operands), Triton GEMM fusions (all, and those whose computation holds an fp8 dot), and
    dot instructions with fp8 operands anywhere."""
    lines = hlo.splitlines()
    dtype = {m.group(1): m.group(2) for m in map(_DEF.match, lines) if m}

    def fp8_operands(line: str) -> bool:
        m = _OPERANDS.search(line)
        names = [a.strip().lstrip("%") for a in m.group(1).split(",")] if m else []
        return any(dtype.get(n, "").startswith(F8) for n in names)

    fp8_dot_computations, current = set(), None
    for ln in lines:
        if not ln.startswith(" ") and ln.rstrip().endswith("{"):
            m = _COMPUTATION.match(ln)
            current = m.group(1) if m else None
        elif " dot(" in ln and fp8_operands(ln) and current:
            fp8_dot_computations.add(current)
    cublas = [ln for ln in lines if 'custom_call_target="__cublas' in ln]
    triton = [ln for ln in lines if "__triton_gemm" in ln and " fusion(" in ln]
    return {"gemm_calls": len(cublas),
            "fp8_gemm_calls": sum(fp8_operands(ln) for ln in cublas),
            "triton_gemm_fusions": len(triton),
            "fp8_triton_gemm_fusions": sum(any(f"calls=%{c}," in ln or ln.rstrip().endswith(f"calls=%{c}")
                                               for c in fp8_dot_computations) for ln in triton),
            "fp8_dot_instructions": sum(" dot(" in ln and fp8_operands(ln) for ln in lines)}


def compiled_hlo(trainer, batch: int, seq: int) -> str:
    return trainer.lower_train_step(batch, seq).compile().as_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_125m.py"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, e.g. model.num_layers=4 (repeatable)")
    parser.add_argument("--precisions", default="bf16,fp8")
    parser.add_argument("--dot-out", choices=("f32", "bf16"), default="f32")
    parser.add_argument("--tag", default="")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    sets = dict(kv.split("=", 1) for kv in args.set)
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
    if args.dot_out == "bf16":  # the experiment: fp8 dots return the compute dtype
        import jax.numpy as jnp

        from tpustack.model import fp8 as fp8_module

        def scaled_dot_out_dtype(a, b, scale_a, scale_b, dtype):
            y = jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=dtype)
            return (y.astype(jnp.float32) / (scale_a * scale_b)).astype(dtype)

        fp8_module.scaled_dot = scaled_dot_out_dtype
    precisions = args.precisions.split(",")
    runs = {p: make(args.config, p, args.batch, args.seq, args.dry_run, sets) for p in precisions}
    rng = np.random.default_rng(0)
    first = next(iter(runs.values()))[0]
    vocab = first.model.vocab_size
    batches = [rng.integers(0, vocab, (args.batch, args.seq + 1)).astype(np.int32) for _ in range(4)]
    result = {"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__, "config": args.config,
              "overrides": sets, "dot_out": args.dot_out, "batch": args.batch, "seq": args.seq,
              "params": int(sum(x.size for x in jax.tree.leaves(next(iter(runs.values()))[2].params))),
              "runs": {}}
    os.makedirs(args.out, exist_ok=True)
    suffix = f"_{args.tag}" if args.tag else ""
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
        hlo = compiled_hlo(trainer, args.batch, args.seq)
        if p == "fp8":
            import gzip

            with gzip.open(os.path.join(args.out, f"fp8_step{suffix}.hlo.txt.gz"), "wt") as f:
                f.write(hlo)
        result["runs"][p] = {"median_step_s": step_s, "tokens_per_s": args.batch * args.seq / step_s,
                             "first_loss": losses[p][0], "last_loss": losses[p][-1], **hlo_census(hlo)}
    with open(os.path.join(args.out, f"fp8_train{suffix}.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nfp8 vs bf16 train step, {result['device']}, jax {jax.__version__}, batch {args.batch} x {args.seq}")
    print(f"{result['params'] / 1e6:.1f}M parameters, overrides {sets}, fp8 dots return {args.dot_out}")
    print("| precision | median step s | tokens/s | first loss | last loss | fp8 / all cuBLAS GEMMs "
          "| fp8 / all Triton GEMMs | fp8 dots |")
    print("|---|---|---|---|---|---|---|---|")
    for p, r in result["runs"].items():
        print(f"| {p} | {r['median_step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['first_loss']:.3f} | "
              f"{r['last_loss']:.3f} | {r['fp8_gemm_calls']} / {r['gemm_calls']} | "
              f"{r['fp8_triton_gemm_fusions']} / {r['triton_gemm_fusions']} | {r['fp8_dot_instructions']} |")
    if {"bf16", "fp8"} <= set(result["runs"]):
        ratio = result["runs"]["bf16"]["median_step_s"] / result["runs"]["fp8"]["median_step_s"]
        print(f"fp8 speedup over bf16: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
