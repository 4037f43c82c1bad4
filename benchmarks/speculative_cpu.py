"""Speculative decoding acceptance vs the chapter's formula, on held-out text.

    tpustack train --workdir runs/tiny
    tpustack distill --teacher runs/tiny --workdir runs/tiny_draft
    python benchmarks/speculative_cpu.py --target runs/tiny --draft runs/tiny_draft

For temperatures 0 and 0.8 and k = 2, 4: draft acceptance (accepted / drafted), the
per-token acceptance a, tokens per round, and (1 - a^(k+1)) / (1 - a); plus plain vs
speculative tokens/s. Writes benchmarks/results/speculative_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--draft", required=True)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "speculative_cpu.json"))
    args = parser.parse_args()

    import jax
    import numpy as np

    from tpustack.config import DataConfig
    from tpustack.data import ByteTokenizer, load_tokens
    from tpustack.infer.decode import Generator
    from tpustack.weights import load_weights
    from tpustack.infer.sampling import SamplingParams, stack_params
    from tpustack.infer.speculative import SpeculativeGenerator, acceptance_stats

    target, draft = load_weights(args.target), load_weights(args.draft)
    heldout = load_tokens(DataConfig(), ByteTokenizer())["heldout"]
    starts = np.random.default_rng(0).integers(0, len(heldout) - args.prompt_len, args.prompts)
    prompts = [heldout[s:s + args.prompt_len].astype(int).tolist() for s in starts]
    n = [args.new_tokens] * len(prompts)

    def timed(gen, sampling):
        stacked = stack_params(sampling)
        for _ in range(2):  # the first call compiles
            start = time.perf_counter()
            state = gen.decode(gen.start(prompts, n, sampling), stacked, 4 * args.new_tokens)
            jax.block_until_ready(state.out_BN)
        return state, float(np.sum(state.count_B)) / (time.perf_counter() - start)

    rows = []
    for temperature in (0.0, 0.8):
        sampling = [SamplingParams(temperature=temperature, seed=i) for i in range(len(prompts))]
        _, plain_tps = timed(Generator(target.cfg, target.params), sampling)
        for k in (2, 4):
            spec = SpeculativeGenerator(target.cfg, target.params, draft_cfg=draft.cfg, draft_params=draft.params, k=k)
            state, spec_tps = timed(spec, sampling)
            rows.append({"temperature": temperature, "k": k, **acceptance_stats(state, k),
                         "plain_tokens_per_s": plain_tps, "speculative_tokens_per_s": spec_tps})
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"target": args.target, "draft": args.draft, "target_params": target.cfg.num_params(),
                   "draft_params": draft.cfg.num_params(), "rows": rows}, f, indent=2)
    print(f"target {target.cfg.num_params() / 1e6:.2f}M, draft {draft.cfg.num_params() / 1e6:.2f}M params; "
          f"{len(prompts)} held-out prompts x {args.new_tokens} tokens")
    print(f"{'T':>4}{'k':>3}{'accept':>8}{'a':>7}{'tok/round':>10}{'formula':>9}{'plain tok/s':>12}{'spec tok/s':>11}")
    for r in rows:
        print(f"{r['temperature']:>4}{r['k']:>3}{r['acceptance_rate']:>8.3f}{r['alpha']:>7.3f}"
              f"{r['tokens_per_round']:>10.2f}{r['predicted_tokens_per_round']:>9.2f}"
              f"{r['plain_tokens_per_s']:>12.0f}{r['speculative_tokens_per_s']:>11.0f}")


if __name__ == "__main__":
    main()
