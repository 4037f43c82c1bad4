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

    from tpustack.infer.bench import load_generator, time_generation
    from tpustack.plan.cost import cost_per_million

    if args.checkpoint is None:
        from tpustack.config import load_config
        from tpustack.infer.decode import Generator
        from tpustack.weights import init_weights

        cfg, params, _ = init_weights(load_config(args.config).model)
        gen = Generator(cfg, params, args.cache_dtype)
    else:
        _, gen = load_generator(args.checkpoint, args.draft, args.speculate_k, args.cache_dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, gen.cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    time_generation(gen, prompts, args.new_tokens)  # compile
    runs = sorted((time_generation(gen, prompts, args.new_tokens) for _ in range(args.repeats)),
                  key=lambda r: r["e2e_s"])
    r = runs[len(runs) // 2]
    print(f"batch {r['batch']}, prompt {r['prompt_len']}, {r['new_tokens']} new tokens (median of {args.repeats})")
    print(f"TTFT {r['ttft_s'] * 1e3:.1f} ms, TPOT {r['tpot_s'] * 1e3:.2f} ms, "
          f"{r['tokens_per_s']:.1f} tokens/s end to end, {r['decode_tokens_per_s']:.1f} tokens/s decoding")
    if "acceptance_rate" in r:
        print(f"draft acceptance rate {r['acceptance_rate']:.3f}")
    if args.price_per_hour:
        print(f"cost: ${cost_per_million(args.price_per_hour, r['tokens_per_s']):.4f} per million "
              f"output tokens at ${args.price_per_hour}/hour")
    return 0
