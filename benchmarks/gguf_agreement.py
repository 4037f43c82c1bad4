"""GGUF exports of a trained model run by llama.cpp (llama-cpp-python) against tpustack: issue 13's
item 2 figures on a real checkpoint (default runs/small_12m; accuracy figures, not timings).

    python benchmarks/gguf_agreement.py [--checkpoint runs/small_12m] [--types q8_0,q4_0,q4_k]

f32: max relative logits error at 64 held-out positions and 32 greedy tokens; each quantized
type: top-1 agreement over 1,000 held-out positions (4 windows of 250) against tpustack on
the file's dequantized weights, file size and tensor types; tokenization on 1,000 strings.
Writes benchmarks/results/gguf_agreement.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import jax  # noqa: E402

from tpustack.checkpoint import Checkpointer  # noqa: E402
from tpustack.config import DataConfig  # noqa: E402
from tpustack.data.sources import load_tokens  # noqa: E402
from tpustack.interop.gguf_agreement import measure  # noqa: E402
from tpustack.machine import cpu_model  # noqa: E402
from tpustack.weights import load_weights, weights_kind  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="runs/small_12m")
    ap.add_argument("--types", default="q8_0,q4_0,q4_k")
    ap.add_argument("--out", default="benchmarks/results/gguf_agreement.json")
    args = ap.parse_args()
    from text_samples import sample_strings

    weights = load_weights(args.checkpoint)
    data, step = DataConfig(), None
    if weights_kind(args.checkpoint) == "workdir":  # its own held-out split
        ckpt = Checkpointer(args.checkpoint, read_only=True)
        data, step = ckpt.config().data, ckpt.latest_step()
        ckpt.close()
    heldout = load_tokens(data, weights.tokenizer)["heldout"]
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="gguf-agreement-") as tmp:
        figures = measure(jax.device_get(weights.params), weights.cfg, weights.tokenizer, heldout, tmp,
                          sample_strings(1000, seed=11), kinds=tuple(args.types.split(",")))
    import llama_cpp

    result = {"checkpoint": args.checkpoint, "step": step, "params": weights.cfg.num_params(),
              "cpu": cpu_model(), "llama_cpp_python": llama_cpp.__version__, "seconds": round(time.time() - start, 1),
              **figures}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    f32 = figures["f32"]
    print(f"{args.checkpoint} step {step}: f32 logits rel err {f32['logits_rel_err']:.2e} at {f32['positions']} "
          f"positions, 32 greedy tokens equal: {f32['greedy_equal']}; tokenization "
          f"{figures['tokenization']['equal']}/{figures['tokenization']['strings']}")
    print(f"{'type':6} {'top-1 agreement':>16} {'positions':>10} {'MB':>8}  tensor types")
    for kind in ("f32", *args.types.split(",")):
        row = figures[kind]
        agree = f"{row['top1_agreement']:.4f}" if "top1_agreement" in row else "-"
        print(f"{kind:6} {agree:>16} {row.get('positions', 64):>10} {row['file_bytes'] / 1e6:8.2f}  {row['tensor_types']}")


if __name__ == "__main__":
    main()
