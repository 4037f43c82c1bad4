"""`tpustack` command line: parse flags, call the library, map user errors to exit code 2.

Imports of the library sit inside the commands on purpose: `choose_platform` must set
JAX_PLATFORMS before anything imports jax, and `--help` should not pay for jax.

    tpustack train  --config configs/tiny.py [--config.model.num_layers=4 ...] [--workdir DIR]
    tpustack distill --teacher DIR [--config configs/tiny_draft.py] [--workdir DIR]
    tpustack eval   --workdir DIR
    tpustack generate --checkpoint DIR [--draft DIR] --prompt TEXT | --prompt-ids 1,2,3 [--json]
                      (`sample` is the same command)
    tpustack export --checkpoint DIR --format hf --out DIR   (DIR: local or gs://)
    tpustack serve --checkpoint DIR [--host 127.0.0.1 --port 8000 --api-key KEY]   (OpenAI-compatible HTTP)
    tpustack bench decode [--checkpoint DIR] [--batch B --prompt-len L --new-tokens N --price-per-hour P]
    tpustack bench serve [--checkpoint DIR | --url URL] [--concurrency 64 | --rate R] [--static] [--peer hf]
                         (tpustack/commands/bench.py, like every command in tpustack/commands/)
    tpustack estimate --config configs/llama2_13b.py [--chip v5p --chips 16 --context 4096 --batch 8]
"""

from __future__ import annotations

import os
import sys

from tpustack.cli_parser import build_parser
from tpustack.commands import command_modules
from tpustack.errors import UserError
from tpustack.platforms import choose_platform

SAMPLE_PROMPTS = ("def ", "import os\n", "class ")


def split_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Pull `--config.a.b=value` / `--config.a.b value` out of argv; a flag is never taken as a value."""

    def is_flag(text: str) -> bool:  # "--workdir", "-h"; not "-1" or "-1e-3"
        try:
            float(text)
        except ValueError:
            return text.startswith("-")
        return False

    rest, overrides = [], {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--config."):
            key, eq, value = arg[len("--config."):].partition("=")
            if not eq:
                if i + 1 >= len(argv) or is_flag(argv[i + 1]):
                    raise UserError(f"{arg}: needs a value, as {arg}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides[key] = value
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _decode(gen, tokenizer, prompts: list[str] | None, ids: list[list[int]], max_new_tokens: int, sampling,
            as_json: bool = False, clamp: bool = False) -> None:
    """The one decode path of `generate`, `sample` and the main job's samples: stream a single
    prompt's text as it decodes, print several prompts as labelled samples, or JSON."""
    import json

    room = gen.cfg.max_seq_len - max(len(i) for i in ids)
    if clamp:  # the main job's samples fit whatever context the config has
        max_new_tokens = max(min(max_new_tokens, room), 1)
    stream = None
    if not as_json and tokenizer is not None and len(ids) == 1:
        if prompts:
            print(prompts[0], end="", flush=True)
        stream = lambda new: print(tokenizer.decode(new[0]), end="", flush=True)  # noqa: E731
    outs = gen.generate(ids, max_new_tokens, sampling, chunk=8, on_tokens=stream)
    for i, out in enumerate(outs):
        text = tokenizer.decode(out) if tokenizer is not None else None
        if as_json:
            print(json.dumps({"prompt_ids": ids[i], "ids": out, "text": text}))
        elif stream is not None:
            print()
        elif tokenizer is None:
            print(",".join(str(t) for t in out))
        else:
            print(f"----- sample (prompt {prompts[i]!r}) -----")
            print(prompts[i] + text)
    sys.stdout.flush()


def _sampling(n: int, temperature: float, top_k: int, top_p: float, seed: int):
    from tpustack.infer.sampling import SamplingParams

    return [SamplingParams(temperature, top_k, top_p, seed + i) for i in range(n)]


def cmd_train(args, overrides) -> int:
    import jax

    from tpustack.config import load_config
    from tpustack.data import load_tokenizer
    from tpustack.infer.decode import Generator
    from tpustack.train.loop import train

    config = load_config(args.config, overrides)
    workdir = args.workdir or os.path.join("runs", config.name)
    result = train(config, workdir)
    if jax.process_index() != 0:  # one host speaks for the job
        return 0
    if result.eval_loss is not None:
        print(f"final: step {result.step}, held-out loss {result.eval_loss:.4f}, "
              f"{result.tokens_per_second:.0f} tokens/s, workdir {workdir}")
    if result.preempted:
        print(f"preempted: checkpoint saved at step {result.step}; rerun the same command to resume")
        return 0
    if args.no_samples or config.train.samples <= 0:
        return 0
    if jax.process_count() > 1:
        print(f"samples: run `tpustack generate --checkpoint {workdir} --prompt ...` on one host")
        return 0
    tokenizer = load_tokenizer(config.data.tokenizer)
    prompts = [SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)] for i in range(config.train.samples)]
    # host copies: training may have left the params sharded over a mesh
    gen = Generator(config.model, jax.device_get(result.params), eos_id=_eos(tokenizer))
    _decode(gen, tokenizer, prompts, [tokenizer.encode(p).tolist() for p in prompts], config.train.sample_len,
            _sampling(len(prompts), 0.8, 0, 1.0, config.train.seed), clamp=True)
    return 0


def cmd_eval(args) -> int:
    import math

    from tpustack.evaluate import heldout_loss

    config, loss = heldout_loss(args.workdir, args.batches)
    print(f"{config.name}: held-out loss {loss:.4f} nats/token, perplexity {math.exp(min(loss, 50)):.3f}")
    return 0


def _eos(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_id", None)
    return -1 if eos is None else eos


def _generator(checkpoint: str, draft: str | None, k: int, cache_dtype: str):
    """(tokenizer, Generator or SpeculativeGenerator) of a checkpoint, through the one loader."""
    from tpustack.infer.bench import load_generator

    return load_generator(checkpoint, draft, k, cache_dtype)


def cmd_generate(args) -> int:
    tok, gen = _generator(args.checkpoint, args.draft, args.speculate_k, args.cache_dtype)
    if args.prompt is not None:
        if tok is None:
            raise UserError(f"--prompt: {args.checkpoint} has no tokenizer; pass --prompt-ids instead")
        ids = [tok.encode(p).tolist() for p in args.prompt]
    else:
        try:
            ids = [[int(x) for x in args.prompt_ids.split(",") if x.strip()]]
        except ValueError:
            raise UserError(f"--prompt-ids {args.prompt_ids!r}: expected comma-separated integers") from None
    _decode(gen, tok, args.prompt, ids, args.max_new_tokens,
            _sampling(len(ids), args.temperature, args.top_k, args.top_p, args.seed), as_json=args.json)
    return 0


def cmd_export(args) -> int:
    from tpustack.export import export

    for path in export(args.checkpoint, args.format, args.out, args.type):
        print(path)
    return 0


def cmd_serve(args) -> int:
    try:
        import signal

        import uvicorn

        from tpustack.infer.server import Server, ServerConfig, create_app
    except ImportError as e:
        raise UserError(f"serve: {e.name} is missing; pip install 'tpustack[serve]'") from None
    from tpustack.infer.engine import Engine, EngineConfig
    from tpustack.infer.runner import Runner
    from tpustack.weights import chat_template_of, load_weights

    cfg, params, tok = load_weights(args.checkpoint)
    if tok is None:
        raise UserError(f"--checkpoint {args.checkpoint!r}: has no tokenizer; the server reads and writes text")
    template, bos, eos = chat_template_of(args.checkpoint)
    draft = None
    if args.draft is not None:
        d = load_weights(args.draft)
        draft = (d.cfg, d.params)
    ecfg = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, max_seqs=args.max_seqs,
                        token_budget=args.token_budget, cache_dtype=args.cache_dtype,
                        max_top_logprobs=0 if draft else args.max_top_logprobs)
    engine = Engine(cfg, params, ecfg, eos_id=_eos(tok), detokenize=tok.decode, draft=draft, k=args.speculate_k)
    del params  # on CPU the engine holds its dense weights packed: the loaded copy would double them
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint)) or "tpustack"
    scfg = ServerConfig(model_name=name, api_key=args.api_key, max_request_bytes=args.max_request_bytes,
                        max_tokens_limit=args.max_tokens_limit)
    server = Server(Runner(engine), tok, scfg, template, bos, eos)
    print(f"serving {name!r} at http://{args.host}:{args.port}/v1 (chat template: "
          f"{'the checkpoint' if template else 'tpustack default'})", file=sys.stderr)
    # uvicorn stops admitting on SIGTERM/SIGINT, lets open requests finish, then the app's shutdown
    # drains the runner; it re-raises the signal afterwards, which these handlers turn into exit 0.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)
    uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="info")
    return 0


def cmd_compile_check(args, overrides) -> int:
    import json

    from tpustack.config import load_config
    from tpustack.plan import steptime
    from tpustack.train.aot import compile_check

    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserError("compile-check: needs libtpu; pip install -e '.[tpu]'") from None
    config = load_config(args.config, overrides)
    try:
        r = compile_check(config, args.topology)
    except RuntimeError as e:  # an unknown topology string, for one
        raise UserError(f"--topology {args.topology!r}: {str(e).splitlines()[0]}") from None
    if args.json:
        print(json.dumps(r, indent=1))
        return 0 if r["compiled"] else 3
    gb = 1e9
    if not r["compiled"]:
        print(f"{r['config']} on {r['topology']} ({r['chips']} chips), mesh {r['mesh']}, ZeRO-{r['zero_stage']}: "
              f"does NOT fit: XLA needs {r['xla_temp_bytes'] / gb:.2f} GB of temporaries per chip beside the "
              f"state (estimate: {r['estimate_total_bytes'] / gb:.2f} GB in all, HBM {r['hbm_bytes'] / gb:.1f} GB); "
              f"shard more (more chips, tensor, stage), remat, or a smaller batch")
        return 3
    print(f"{r['config']} on {r['topology']} ({r['chips']} chips), mesh {r['mesh']}, ZeRO-{r['zero_stage']}: "
          f"compiles" + (f", pipeline bubble {r['pipeline_bubble']:.1%}" if r["pipeline_bubble"] else ""))
    print(f"per chip   XLA: {r['xla_total_bytes'] / gb:.2f} GB (state/args {r['xla_argument_bytes'] / gb:.2f}, "
          f"temp {r['xla_temp_bytes'] / gb:.2f})   estimate: {r['estimate_total_bytes'] / gb:.2f} GB "
          f"(state {r['estimate_state_bytes'] / gb:.2f}, temp {r['estimate_temp_bytes'] / gb:.2f})")
    if r["hbm_bytes"]:
        verdict = "fits" if r["fits"] else "does NOT fit"
        print(f"HBM per chip {r['hbm_bytes'] / gb:.1f} GB: {verdict}")
    print(f"FLOPs per step per chip: {r['flops_per_step_per_chip']:.3e} (XLA's cost analysis: loop bodies once)")
    print(steptime.render(r["step_time"]) + " (from the compiled HLO)")
    return 0


def cmd_estimate(args, overrides) -> int:
    import json

    from tpustack.config import load_config
    from tpustack.plan.estimate import plot, report, render
    from tpustack.plan.chips import chip

    for flag in ("chips", "context", "batch"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}={getattr(args, flag)}: must be >= 1")
    config = load_config(args.config, overrides)
    if args.suggest or args.time:
        return _estimate_time(args, config)
    spec = chip(args.chip)
    result = report(config, spec, args.chips, args.context, args.batch, args.price, args.tokens_per_s)
    if args.plot:
        plot(config, spec, args.context, args.batch, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result, indent=1) if args.json else render(result, args.ops))
    return 0


def _estimate_time(args, config) -> int:
    """`estimate --time` (the config's layout) and `estimate --suggest` (the best layouts)."""
    import json

    from tpustack.mesh import mesh_shape
    from tpustack.plan import steptime, suggest
    from tpustack.plan.chips import CHIPS

    if args.chip not in steptime.TORUS_DIMS:
        raise UserError(f"--chip {args.chip}: --time and --suggest model TPU slices; one of "
                        f"{', '.join(steptime.TORUS_DIMS)}")
    topology = args.topology or steptime.default_topology(args.chip, args.chips)
    if args.suggest:
        rows = suggest.suggest(config, args.config, args.chip, args.chips, topology=topology)
        print(json.dumps(rows, indent=1) if args.json else suggest.render(rows, CHIPS[args.chip].hbm_bytes))
        return 0 if rows else 3
    mesh = mesh_shape(config.mesh, args.chips)
    st = steptime.analytic(config, args.chip, mesh, topology).as_dict()
    r = {"config": config.name, "topology": topology, "mesh": mesh, "step_time": st}
    print(json.dumps(r, indent=1) if args.json else f"{config.name} on {topology}, mesh {mesh}: "
          + steptime.render(st))
    return 0


def _quiet_library_logs() -> None:
    """orbax logs routine notices (read-only managers, metadata) as absl warnings."""
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    choose_platform()  # before jax is imported
    _quiet_library_logs()
    try:
        from tpustack.distributed import initialize

        initialize()  # multi-host: before anything touches a device
        rest, overrides = split_overrides(argv)
        args = build_parser().parse_args(rest)
        if overrides and args.command not in ("train", "distill", "estimate", "compile-check"):
            raise UserError(f"--config.{next(iter(overrides))}: config overrides apply to `train`, `distill`, "
                            f"`estimate` and `compile-check` only")
        if args.command == "train":
            return cmd_train(args, overrides)
        if args.command == "distill":
            return cmd_train(args, {**overrides, "distill.teacher": args.teacher})
        if args.command == "estimate":
            return cmd_estimate(args, overrides)
        if args.command == "compile-check":
            return cmd_compile_check(args, overrides)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command in ("generate", "sample"):
            return cmd_generate(args)
        return command_modules()[args.command].run(args)  # tpustack/commands/*.py
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
