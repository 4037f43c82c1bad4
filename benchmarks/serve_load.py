"""Issue 11, item 5: 64 concurrent streams for 60 s against the OpenAI-compatible server, then
0 errors and 0 KV pages held. The server is `tpustack serve`'s app (the Runner's engine under
uvicorn on 127.0.0.1, in this process); the clients are bench serve's streaming HTTP driver,
each sending its next request as soon as its last one ends. tests/test_serve_load.py runs
the same loop for a few seconds.

    python benchmarks/serve_load.py [--checkpoint DIR | --config configs/tiny.py] [--streams 64 --seconds 60]

Exits 1 on any error or a page still held. The throughput figures it also writes are only
meaningful on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tpustack.platforms import choose_platform  # noqa: E402

choose_platform()

from tpustack import paths  # noqa: E402
from tpustack.config import load_config  # noqa: E402
from tpustack.data.tokenizers import ByteTokenizer  # noqa: E402
from tpustack.infer.engine import Engine, EngineConfig  # noqa: E402
from tpustack.infer.load_drivers import local_server, run_http  # noqa: E402
from tpustack.infer.loadgen import make_workload, summarize  # noqa: E402
from tpustack.infer.runner import Runner  # noqa: E402
from tpustack.infer.serve_bench import machine  # noqa: E402
from tpustack.infer.server import Server, ServerConfig, create_app  # noqa: E402
from tpustack.weights import init_weights, load_weights  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="weights (default: random weights of --config)")
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.py"))
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of the same load first, not counted")
    p.add_argument("--prompt-len", type=float, default=64, help="mean prompt tokens (lognormal)")
    p.add_argument("--output-len", type=float, default=64, help="mean output tokens (lognormal)")
    p.add_argument("--num-pages", type=int, default=0, help="KV pages (0: half of what --streams average "
                   "requests need, so the load preempts)")
    p.add_argument("--token-budget", type=int, default=256)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "serve_load.json"))
    args = p.parse_args()

    weights = load_weights(args.checkpoint) if args.checkpoint else init_weights(load_config(args.config).model)
    cfg, tok = weights.cfg, weights.tokenizer or ByteTokenizer()
    workload = make_workload(4 * args.streams, cfg.vocab_size, cfg.max_seq_len, seed=0, prompt_mean=args.prompt_len,
                             output_mean=args.output_len, output_range=(8, 256))
    page = 16
    sizes = [-(-(len(q) + m) // page) for q, m in zip(workload.prompts, workload.max_tokens)]
    pages = args.num_pages or max(args.streams * sum(sizes) // len(sizes) // 2, 2 * max(sizes)) + 1
    budget = max(args.token_budget, args.streams)
    ecfg = EngineConfig(page_size=page, num_pages=pages, max_seqs=args.streams, token_budget=budget,
                        token_buckets=(max(budget // 4, 1), budget), seq_buckets=(max(args.streams // 4, 1), args.streams))
    engine = Engine(cfg, weights.params, ecfg, eos_id=-1, detokenize=tok.decode)  # no EOS: full lengths
    server = Server(Runner(engine), tok, ServerConfig(model_name="load", max_tokens_limit=cfg.max_seq_len))
    with local_server(create_app(server)) as url:
        print(f"warm-up (compiles), then {args.streams} streams for {args.seconds:.0f} s at {url} ...",
              file=sys.stderr, flush=True)
        run_http(url, workload.with_new_tokens(1, cfg.vocab_size), concurrency=args.streams, duration=args.warmup)
        preempted = engine.stats.preemptions
        records = run_http(url, workload, concurrency=args.streams, duration=args.seconds, timeout=600)
        preempted = engine.stats.preemptions - preempted
        held_after = engine.pool.in_use()
        engine.pool.check()
    errors = [r.error for r in records if r.error]
    short = sum(r.error is None and r.n_out != workload.max_tokens[r.index] for r in records)
    result = {"benchmark": "serve_load", "machine": machine(), "weights": args.checkpoint or args.config,
              "streams": args.streams, "seconds": args.seconds, "requests": len(records), "errors": len(errors),
              "first_errors": errors[:5], "short_outputs": short, "pages_in_use_after": held_after,
              "pool_pages": engine.pool.capacity, "preemptions": preempted,
              "engine_error": repr(server.runner.error) if server.runner.error else None,
              "figures": summarize(records)}
    if not paths.is_remote(args.out):
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    paths.write_text(args.out, json.dumps(result, indent=1))
    print(f"{'streams':<24}{args.streams}\n{'seconds':<24}{args.seconds:.0f}\n{'requests finished':<24}"
          f"{len(records)}\n{'errors':<24}{len(errors)}\n{'outputs cut short':<24}{short}\n"
          f"{'preemptions':<24}{preempted}\n{'KV pages held after':<24}{held_after} of "
          f"{engine.pool.capacity}\n{'output tokens/s':<24}{result['figures'].get('output_throughput', 0):.1f} "
          f"(void unless the machine was quiet)")
    ok = not errors and not short and held_after == 0 and server.runner.error is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
