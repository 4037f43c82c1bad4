"""`tpustack bench serve`: one seeded workload through each mode asked for, side by side.

Modes: `engine` (continuous batching in this process) or `server` (--url: a running
`tpustack serve`, streamed over HTTP), then `static` (pad-to-longest batches of the decode
loop) and `hf` (transformers' generate) on the same weights. Each mode first runs the
workload `--warmup` times untimed, with other tokens, so the timed pass compiles nothing
and finds none of its prompts in the prefix cache (each mode reports the shapes it still
compiled; transformers warms up on one batch: torch compiles nothing). Greedy outputs are compared per request: engine vs
static must agree on the first token of at least AGREEMENT_FLOOR of the requests (the
same library on the same weights; later tokens may part at a near-tie), and the share of
equal outputs and of the common prefix is reported for every pair that has tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys

from tpustack import paths
from tpustack.config import load_config
from tpustack.errors import UserError
from tpustack.infer.decode import Generator
from tpustack.infer.engine import Engine, EngineConfig
from tpustack.infer.load_drivers import hf_model, run_engine, run_hf, run_http, run_static
from tpustack.infer.loadgen import agreement, make_workload, render, summarize
from tpustack.machine import cpu_description
from tpustack.weights import init_weights, load_weights

AGREEMENT_FLOOR = 0.95
MODES = ("engine", "server", "static", "hf")


def modes_of(args: argparse.Namespace) -> list[str]:
    """The modes to run, in order: --modes if given, else engine (server with --url) plus
    --static and --peer hf."""
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES]
        if bad or not modes:
            raise UserError(f"--modes {args.modes!r}: give a comma list of {', '.join(MODES)}")
        if "server" in modes and not args.url:
            raise UserError("--modes server: needs --url (a running tpustack serve)")
        if "engine" in modes and args.url:
            raise UserError("--modes engine with --url: the engine runs in-process; use server")
        return list(dict.fromkeys(modes))
    return ["server" if args.url else "engine"] + ["static"] * args.static + ["hf"] * (args.peer == "hf")


def machine() -> str:
    """The CPU model and core count (and the accelerator, if any): figures mean little without it."""
    import jax

    device = jax.devices()[0]
    return cpu_description() + ("" if device.platform == "cpu" else f", {device.device_kind}")


def check_args(args: argparse.Namespace) -> None:
    """Flags a user can get wrong, each named with its fix."""
    positive = {"--num-prompts": args.num_prompts, "--page-size": args.page_size, "--max-seqs": args.max_seqs,
                "--static-rounds": args.static_rounds, "--batch": args.batch or 1,
                "--concurrency": args.concurrency or 1}
    for flag, value in positive.items():
        if value < 1:
            raise UserError(f"{flag} {value}: must be >= 1")
    if args.warmup < 0 or args.num_pages < 0:
        raise UserError("--warmup and --num-pages: must be >= 0")
    if not args.rate > 0:
        raise UserError(f"--rate {args.rate}: must be > 0 (default: every request at once)")
    modes = modes_of(args)
    if args.url and ({"static", "hf"} & set(modes)) and args.checkpoint is None:
        raise UserError("--static/--peer with --url: give --checkpoint (the server's weights) so every mode "
                        "runs the same model")
    if args.url and args.draft:
        raise UserError("--draft: applies to the in-process engine; start the server with --draft instead")


def engine_config(args: argparse.Namespace, context: int, workload) -> EngineConfig:
    longest = max(len(p) + m for p, m in zip(workload.prompts, workload.max_tokens))
    need = -(-(min(longest, context) + (args.speculate_k if args.draft else 0)) // args.page_size)
    pages = args.num_pages or args.max_seqs * need + 1  # the null page
    return EngineConfig(page_size=args.page_size, num_pages=pages, max_seqs=args.max_seqs,
                        token_budget=max(args.token_budget, args.max_seqs), chunk_size=args.chunk_size,
                        prefix_caching=not args.no_prefix_caching, cache_dtype=args.cache_dtype)


def _timed(run, workload, warmup: int, vocab: int, head: int | None = None, mode: str = ""):
    """run(workload, desc) after `warmup` untimed passes over workloads of the same shape (they
    compile; `head`: only the first requests, where nothing compiles and a pass only warms caches)."""
    for i in range(warmup):
        warm = workload.with_new_tokens(10_000 + i, vocab)
        run(warm if head is None else dataclasses.replace(warm, prompts=warm.prompts[:head],
                                                          max_tokens=warm.max_tokens[:head],
                                                          arrivals=[0.0] * min(head, len(warm))),
            f"{mode} warm-up")
    return run(workload, f"{mode} timed")


def bench_serve(args: argparse.Namespace) -> int:
    """Run every mode asked for, printing each one's figures (and writing the JSON so far) as
    soon as it ends; then the table side by side; exit 3 if engine and static disagree."""
    check_args(args)
    modes = modes_of(args)
    weights = load_weights(args.checkpoint) if args.checkpoint else init_weights(load_config(args.config).model)
    cfg, params = weights.cfg, weights.params
    workload = make_workload(args.num_prompts, cfg.vocab_size, cfg.max_seq_len, args.seed, args.prompt_len,
                             args.output_len, args.len_sigma, (args.min_output, args.max_output), args.rate,
                             args.shared_prefix)
    batch = args.batch or args.concurrency or args.max_seqs
    conc = args.concurrency
    records, extras = {}, {}
    report = {"machine": machine(), "weights": args.checkpoint or args.config,
              "params": cfg.num_params(), "args": {k: (None if v == math.inf else v) for k, v in vars(args).items()},
              "modes": modes, "workload": _describe(workload), "static_batch": batch}
    print(f"{report['machine']}; {cfg.num_params() / 1e6:.1f}M parameters; {len(workload)} requests, "
          f"{report['workload']['prompt_tokens']} prompt + {report['workload']['output_tokens']} output tokens; "
          f"{'all at once' if args.rate == math.inf else f'{args.rate}/s Poisson'}, "
          f"concurrency {conc or 'unbounded'}; modes {', '.join(modes)}", flush=True)
    for mode in modes:
        run, head, info = _mode_runner(mode, args, cfg, params, workload, batch)
        got = _timed(run, workload, args.warmup, cfg.vocab_size, head=head, mode=mode)
        records[mode], extras[mode] = got if isinstance(got, tuple) else (got, {})
        extras[mode].update(info)
        _report(report, records, extras, args)  # this mode's figures now: a long run shows progress
        print(f"[{mode} done]", flush=True)
        if mode == "engine":
            _engine_lines(extras["engine"])
        print(render({mode: report["results"][mode]}), flush=True)
    agree, results = report["agreement"], report["results"]
    print("\nall modes:")
    for pair, a in agree.items():
        if a.get("requests"):
            print(f"greedy agreement {pair}: first token {a['first_token_equal']:.1%}, whole output "
                  f"{a['all_equal']:.1%}, mean common prefix {a['mean_common_prefix']:.1%}")
    print(render(results), flush=True)
    pair = agree.get("engine_vs_static")
    if pair and pair.get("requests") and pair["first_token_equal"] < AGREEMENT_FLOOR:
        print(f"error: engine and static decode disagree on the first token of "
              f"{1 - pair['first_token_equal']:.1%} of requests", file=sys.stderr)
        return 3
    return 0


def _mode_runner(mode: str, args, cfg, params, workload, batch: int):
    """(run(workload, progress label) -> records or (records, figures), warm-up head, figures to add)
    for one mode."""
    conc = args.concurrency
    if mode == "server":
        return (lambda w, desc: run_http(args.url, w, conc, args.model, args.api_key)), None, {}
    if mode == "engine":
        draft = None
        if args.draft:
            d = load_weights(args.draft)
            draft = (d.cfg, d.params)
        ecfg = engine_config(args, cfg.max_seq_len, workload)
        engine = Engine(cfg, params, ecfg, eos_id=-1, draft=draft, k=args.speculate_k)
        config = {k: v for k, v in vars(ecfg).items() if not isinstance(v, tuple)}
        return (lambda w, desc: run_engine(engine, w, conc, desc)), None, {"config": config}
    if mode == "static":
        gen = Generator(cfg, params, args.cache_dtype, eos_id=-1)
        return (lambda w, desc: run_static(gen, w, batch, conc, args.static_rounds, desc)), None, {}
    model = hf_model(cfg, params)
    # torch compiles nothing: a few requests warm its allocator and threads
    return (lambda w, desc: run_hf(model, w, batch, conc, desc)), min(batch, 4), {}


def _report(report: dict, records: dict, extras: dict, args) -> None:
    """Fill the report's results and agreement from the modes run so far; write --out if given."""
    report["results"] = {mode: summarize(recs, args.slo_ttft, args.slo_tpot) for mode, recs in records.items()}
    first = next(iter(records))
    report["agreement"] = {f"{first}_vs_{mode}": agreement(records[first], records[mode])
                           for mode in list(records)[1:]}
    report["extras"] = extras
    if "engine" in extras:
        _peak_share(extras["engine"])
    if args.out:
        paths.write_text(args.out, json.dumps(report, indent=1))
        print(f"wrote {args.out} ({', '.join(records)})", file=sys.stderr, flush=True)


def _peak_share(e: dict) -> None:
    """The engine's full-batch decode GFLOP/s against the matmul peak measured now (tpustack.plan.chips:
    a large f32 jnp.dot on CPU; the chip table elsewhere)."""
    import jax

    from tpustack.plan.chips import chip_for_device

    d = e.get("full_batch_decode")
    if d and "matmul_peak_gflops" not in d:
        peak = chip_for_device(jax.devices()[0]).peak_flops / 1e9
        d["matmul_peak_gflops"], d["share_of_peak"] = peak, d["gflops"] / peak if peak else None


def _engine_lines(e: dict) -> None:
    """The engine's KV waste, prefix cache, and its full-batch decode step against the matmul peak."""
    waste = lambda x: "-" if x is None else f"{x:.1%}"  # noqa: E731
    print(f"engine: {e['steps']} steps, {e['preemptions']} preemptions, KV waste {waste(e['kv_waste_paged'])} "
          f"(a contiguous max-length cache: {waste(e['kv_waste_contiguous_max_len'])}), prefix-cache hit "
          f"rate {e['prefix_cache_hit_rate']:.1%}, compiled during the timed pass: {e['compiled_shapes_during_run']}")
    d = e.get("full_batch_decode")
    if d:
        peak = d["matmul_peak_gflops"]
        print(f"engine decode steps at {d['sequences']} sequences ({d['steps']} steps): median "
              f"{d['median_step_s'] * 1e3:.1f} ms, {d['tokens_per_s']:.0f} tokens/s, {d['gflops']:.1f} GFLOP/s"
              + (f" = {d['share_of_peak']:.0%} of the matmul peak ({peak:.0f} GFLOP/s)" if peak else ""))


def _describe(workload) -> dict:
    prompts = [len(p) for p in workload.prompts]
    return {"requests": len(workload), "prompt_tokens": sum(prompts), "output_tokens": sum(workload.max_tokens),
            "prompt_len": {"min": min(prompts), "mean": sum(prompts) / len(prompts), "max": max(prompts)},
            "output_len": {"min": min(workload.max_tokens), "mean": sum(workload.max_tokens) / len(workload),
                           "max": max(workload.max_tokens)},
            "arrival_span_s": workload.arrivals[-1]}
