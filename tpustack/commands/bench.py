"""`tpustack bench decode | serve`: decode timing, and serving figures as vLLM's benchmark_serving.

    tpustack bench decode [--checkpoint DIR] [--batch B --prompt-len L --new-tokens N --price-per-hour P]
    tpustack bench serve [--checkpoint DIR | --config configs/bench_125m.py] [--url http://127.0.0.1:8000]
                         [--num-prompts 64 --concurrency 64 | --rate R] [--static] [--peer hf]
                         [--modes engine,static,hf]
                         [--slo-ttft MS --slo-tpot MS] [--out FILE.json (local or gs://)]

`bench serve` runs one seeded workload (tpustack.infer.loadgen) through the engine in this
process (or a running server with --url), and with --static / --peer hf through static
batches of the decode loop / transformers' generate on the same weights; it prints one
table (TTFT, TPOT, ITL at mean/p50/p99, throughputs, goodput) and checks that greedy
outputs agree between the modes.
"""

from __future__ import annotations

import argparse
import math
import os


HELP = "measure decoding (decode: TTFT, TPOT, tokens/s, cost) or serving (serve: vLLM's figures; CB vs static, HF)"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                              "configs", "tiny.py")
CACHE_DTYPES = ("float32", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", required=True)
    dec = sub.add_parser("decode", help="TTFT, TPOT, tokens/s of one batch through the decode loop")
    _weights_arguments(dec)
    dec.add_argument("--draft", default=None)
    dec.add_argument("--speculate-k", type=int, default=4)
    dec.add_argument("--batch", type=int, default=1)
    dec.add_argument("--prompt-len", type=int, default=128)
    dec.add_argument("--new-tokens", type=int, default=128)
    dec.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    dec.add_argument("--price-per-hour", type=float, default=None, help="$/hour of the machine")
    dec.add_argument("--repeats", type=int, default=3)
    dec.add_argument("--out", default=None, help="write the figures as JSON here (with --draft: plain and "
                     "speculative side by side)")
    srv = sub.add_parser("serve", help="serving figures (TTFT, TPOT, ITL, throughput, goodput) under a "
                                       "seeded load: the engine, a server (--url), static batches, transformers")
    _weights_arguments(srv)
    _serve_arguments(srv)


def _weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="a workdir or HF directory, local or gs:// (default: "
                   "random weights of --config)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model config for random weights")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target and baselines")
    g.add_argument("--url", default=None, help="a running server's base URL (default: the engine in-process)")
    g.add_argument("--model", default=None, help="--url: the model id (default: the server's first)")
    g.add_argument("--api-key", default=None)
    g.add_argument("--modes", default=None, help="comma list of engine, server, static, hf, run in this order "
                   "on the same seeded workload, each printed (and --out written) as it ends (default: engine or "
                   "server, plus --static / --peer)")
    g.add_argument("--static", action="store_true", help="also run static pad-to-longest batches (decode loop)")
    g.add_argument("--peer", choices=["hf"], default=None, help="also run transformers' generate in batches")
    g.add_argument("--batch", type=int, default=None, help="static / HF batch size (default: --concurrency, "
                   "else --max-seqs)")
    g.add_argument("--static-rounds", type=int, default=8, help="decode rounds between reads of a static batch")
    g.add_argument("--warmup", type=int, default=1, help="untimed passes of the workload per mode first "
                   "(compiles every shape the timed pass needs)")
    g.add_argument("--out", default=None, help="write the figures as JSON here (local or gs://)")
    w = p.add_argument_group("workload (seeded)")
    w.add_argument("--num-prompts", type=int, default=64)
    w.add_argument("--rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all "
                   "at once)")
    w.add_argument("--concurrency", type=int, default=None, help="at most this many requests in flight")
    w.add_argument("--prompt-len", type=float, default=256, help="mean prompt tokens (lognormal)")
    w.add_argument("--output-len", type=float, default=128, help="mean output tokens (lognormal)")
    w.add_argument("--len-sigma", type=float, default=1.0, help="lognormal sigma of both (0: fixed lengths)")
    w.add_argument("--min-output", type=int, default=16)
    w.add_argument("--max-output", type=int, default=256)
    w.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--slo-ttft", type=float, default=None, help="goodput's TTFT bound, ms")
    w.add_argument("--slo-tpot", type=float, default=None, help="goodput's TPOT bound, ms")
    e = p.add_argument_group("engine (in-process)")
    e.add_argument("--page-size", type=int, default=16)
    e.add_argument("--num-pages", type=int, default=0, help="KV pages (0: enough for --max-seqs longest requests)")
    e.add_argument("--max-seqs", type=int, default=64)
    e.add_argument("--token-budget", type=int, default=512)
    e.add_argument("--chunk-size", type=int, default=0, help="prompt tokens per request per step (0: budget)")
    e.add_argument("--no-prefix-caching", action="store_true")
    e.add_argument("--cache-dtype", default="float32", choices=CACHE_DTYPES)
    e.add_argument("--draft", default=None, help="a draft model for speculative decoding in the engine")
    e.add_argument("--speculate-k", type=int, default=4)


def run(args: argparse.Namespace) -> int:
    if args.what == "decode":
        return _decode(args)
    from tpustack.infer.serve_bench import bench_serve  # loads jax

    return bench_serve(args)


def _decode(args) -> int:
    import numpy as np

    from tpustack.infer.bench import load_generator

    if args.checkpoint is None:
        from tpustack.config import load_config
        from tpustack.infer.decode import Generator
        from tpustack.weights import init_weights

        cfg, params, _ = init_weights(load_config(args.config).model)
        gens = {"plain": Generator(cfg, params, args.cache_dtype)}
    else:
        gens = {"plain": load_generator(args.checkpoint, None, cache_dtype=args.cache_dtype)[1]}
        if args.draft:  # the same target decoded plainly, timed in the same run: the speedup is a ratio
            gens["speculative"] = load_generator(args.checkpoint, args.draft, args.speculate_k, args.cache_dtype)[1]
            if _native_decode(gens["plain"]):  # and plainly on XLA alone: the speedup is over the faster
                gens["plain_xla"] = load_generator(args.checkpoint, None, cache_dtype=args.cache_dtype,
                                                   decode_kernels="xla")[1]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, gens["plain"].cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    results = _timed_interleaved(gens, prompts, args.new_tokens, args.repeats)
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens (median of {args.repeats})")
    for name, r in results.items():
        line = (f"{name:>11}: TTFT {r['ttft_s'] * 1e3:.1f} ms, TPOT {r['tpot_s'] * 1e3:.2f} ms, "
                f"{r['tokens_per_s']:.1f} tokens/s end to end, {r['decode_tokens_per_s']:.1f} tokens/s decoding")
        if "acceptance_rate" in r:
            line += f", draft acceptance {r['acceptance_rate']:.3f} (k={args.speculate_k})"
        print(line)
    report = {name: {key: v for key, v in r.items() if key != "tokens"} for name, r in results.items()}
    if "speculative" in results:
        spec = results["speculative"]
        plains = [name for name in results if name.startswith("plain")]
        best = max(plains, key=lambda name: results[name]["decode_tokens_per_s"])
        report["speedup"] = spec["decode_tokens_per_s"] / results[best]["decode_tokens_per_s"]
        report["speedup_over"] = best
        report["identical_tokens"] = all(spec["tokens"] == results[name]["tokens"] for name in plains)
        print(f"speculative / {best} (the faster plain decoding) tokens/s: {report['speedup']:.2f}x; "
              f"outputs identical: {report['identical_tokens']}")
    if args.price_per_hour:
        from tpustack.plan.cost import cost_per_million

        r = results[list(results)[-1]]
        print(f"cost: ${cost_per_million(args.price_per_hour, r['tokens_per_s']):.4f} per million "
              f"output tokens at ${args.price_per_hour}/hour")
    if args.out:
        import json

        from tpustack.infer.serve_bench import machine

        report.update(machine=machine(), checkpoint=args.checkpoint, draft=args.draft,
                      speculate_k=args.speculate_k, batch=args.batch, prompt_len=args.prompt_len,
                      new_tokens=args.new_tokens, repeats=args.repeats,
                      target_params=gens["plain"].cfg.num_params(),
                      draft_params=gens["speculative"].draft_cfg.num_params() if "speculative" in gens else None)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _native_decode(gen) -> bool:
    """Whether this generator's decode steps take tpustack's native CPU kernels (model.decode_kernels)."""
    from tpustack.kernels import matmul_impl

    return gen.cfg.decode_kernels == "auto" and matmul_impl(1, gen.cfg.dtype) == "cpu"


def _timed_interleaved(gens: dict, prompts: list[list[int]], new_tokens: int, repeats: int) -> dict:
    """Median-by-end-to-end of `repeats` timed runs per generator, after one compiling run each;
    the generators alternate, so load drifting over the run hits them alike."""
    from tpustack.infer.bench import time_generation

    for gen in gens.values():
        time_generation(gen, prompts, new_tokens)  # compile
    runs = {name: [] for name in gens}
    for _ in range(repeats):
        for name, gen in gens.items():
            runs[name].append(time_generation(gen, prompts, new_tokens))
    return {name: sorted(rs, key=lambda r: r["e2e_s"])[len(rs) // 2] for name, rs in runs.items()}
