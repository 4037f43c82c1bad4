"""Peak RSS of `tpustack generate` on a workdir against the bytes it must hold: params + KV cache.

    python benchmarks/generate_rss.py --workdir runs/bench_125m [--new-tokens 32] [--repeats 3]

Each run is a fresh `tpustack generate` process; its peak RSS comes from the kernel
(getrusage of the child). The floor is the same CLI's `generate` on
configs/tiny.py (1.3M parameters): Python, jax, XLA's compiler and a decode program's own
buffers, which any weights add to. Prints peak / (params + cache), both with and without that floor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from tpustack.machine import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def peak_rss_bytes(args: list[str]) -> int:
    """Peak RSS of one `tpustack` process, read by a fresh wrapper so no other child counts."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
               "sys.stderr.write(r.stderr[-2000:] if r.returncode else ''); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if r.returncode == 0 else -1)")
    out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "tpustack", *args], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    kib = int(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else -1
    if kib < 0:
        raise SystemExit(f"tpustack {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return kib * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--floor-workdir", default=None, help="a configs/tiny.py workdir for the floor (optional)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate_rss.json"))
    args = parser.parse_args()

    from tpustack.infer.cache import cache_bytes
    from tpustack.infer.decode import bucket
    from tpustack.weights import load_weights

    cfg, params, tokenizer = load_weights(args.workdir)
    param_bytes = sum(x.nbytes for x in __import__("jax").tree.leaves(params))
    prompt_len = len(tokenizer.encode(args.prompt))
    kv = cache_bytes(cfg, 1, bucket(prompt_len + args.new_tokens))
    del params
    gen = ["generate", "--prompt", args.prompt, "--max-new-tokens", str(args.new_tokens)]
    floor = peak_rss_bytes([*gen, "--checkpoint", args.floor_workdir]) if args.floor_workdir else 0
    peak = peak_rss_bytes([*gen, "--checkpoint", args.workdir])
    result = {"cpu": cpu_model(), "workdir": args.workdir, "param_bytes": param_bytes, "cache_bytes": kv,
              "peak_rss_bytes": peak, "floor_rss_bytes": floor,
              "peak_over_need": peak / (param_bytes + kv),
              "above_floor_over_need": (peak - floor) / (param_bytes + kv) if floor else None}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    mb = 1e6
    print(f"{result['cpu']}: params {param_bytes / mb:.0f} MB + cache {kv / mb:.1f} MB")
    print(f"peak RSS {peak / mb:.0f} MB = {result['peak_over_need']:.2f}x params + cache"
          + (f"; floor {floor / mb:.0f} MB, above it {result['above_floor_over_need']:.2f}x" if floor else ""))


if __name__ == "__main__":
    main()
