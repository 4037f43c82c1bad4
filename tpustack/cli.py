"""`tpustack` command line: parse flags, call the library, map user errors to exit code 2.

    tpustack train  --config configs/tiny.py [--config.model.num_layers=4 ...] [--workdir DIR]
    tpustack distill --teacher DIR [--config configs/tiny_draft.py] [--workdir DIR]
    tpustack eval   --workdir DIR
    tpustack generate --checkpoint DIR [--draft DIR] --prompt TEXT | --prompt-ids 1,2,3 [--json]
                      (`sample` is the same command)
    tpustack export --checkpoint DIR --format hf --out DIR   (DIR: local or gs://)
    tpustack serve --checkpoint DIR [--host 127.0.0.1 --port 8000 --api-key KEY]   (OpenAI-compatible HTTP)
    tpustack bench decode [--checkpoint DIR] [--batch B --prompt-len L --new-tokens N --price-per-hour P]
    tpustack estimate --config configs/llama2_13b.py [--chip v5p --chips 16 --context 4096 --batch 8]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys

from tpustack.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")
SAMPLE_PROMPTS = ("def ", "import os\n", "class ")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message} (see --help)")


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


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tpustack", description="Train and sample Llama-family models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train (resuming from --workdir), then print samples")
    train.add_argument("--config", default=DEFAULT_CONFIG, help="config file, path.py[:arg]")
    train.add_argument("--workdir", default=None, help="checkpoints and TensorBoard logs (default runs/NAME)")
    train.add_argument("--no-samples", action="store_true", help="skip the samples printed after training")
    dst = sub.add_parser("distill", help="train a small student (a draft) from a teacher: a*CE + (1-a)*T^2*KL")
    dst.add_argument("--teacher", required=True, help="the teacher's tpustack workdir or HF directory")
    dst.add_argument("--config", default=os.path.join(os.path.dirname(DEFAULT_CONFIG), "tiny_draft.py"),
                     help="the student's config, path.py[:arg]; --config.distill.alpha / .temperature")
    dst.add_argument("--workdir", default=None, help="the student's workdir (default runs/NAME)")
    dst.add_argument("--no-samples", action="store_true")
    ev = sub.add_parser("eval", help="held-out loss of a workdir's latest checkpoint")
    ev.add_argument("--workdir", required=True)
    ev.add_argument("--batches", type=int, default=None, help="held-out batches (default: the config's)")
    gen = sub.add_parser("generate", aliases=["sample"],
                         help="decode with the KV cache (optionally speculative), streaming")
    gen.add_argument("--checkpoint", required=True, help="a tpustack workdir or a Hugging Face Llama directory")
    gen.add_argument("--draft", default=None, help="a draft model (same formats) for speculative decoding")
    gen.add_argument("--speculate-k", type=int, default=4, help="tokens the draft proposes per round")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", help="prompt text (repeatable: one row each; needs a "
                        "tokenizer with the checkpoint)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    gen.add_argument("--json", action="store_true", help="print the generated ids and text as JSON")
    exp = sub.add_parser("export", help="write a checkpoint's weights in another format (hf: a Hugging Face "
                                        "directory transformers loads)")
    exp.add_argument("--checkpoint", required=True, help="a tpustack workdir or a Hugging Face directory")
    exp.add_argument("--format", required=True, help="hf")
    exp.add_argument("--out", required=True, help="a new directory, local or gs://")
    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server: continuous batching over a paged KV "
                                       "cache (/v1/completions, /v1/chat/completions, /metrics)")
    srv.add_argument("--checkpoint", required=True, help="a tpustack workdir or a Hugging Face directory")
    srv.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` on /v1/*")
    srv.add_argument("--model-name", default=None, help="the model id clients name (default: the checkpoint's "
                     "directory name)")
    srv.add_argument("--draft", default=None, help="a draft model for speculative decoding in the engine")
    srv.add_argument("--speculate-k", type=int, default=4)
    srv.add_argument("--page-size", type=int, default=16)
    srv.add_argument("--num-pages", type=int, default=1024, help="KV cache pages (each page-size tokens)")
    srv.add_argument("--max-seqs", type=int, default=32, help="sequences per engine step")
    srv.add_argument("--token-budget", type=int, default=256, help="tokens per engine step")
    srv.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--max-top-logprobs", type=int, default=5)
    srv.add_argument("--max-tokens-limit", type=int, default=4096, help="the most tokens a request may ask for")
    srv.add_argument("--max-request-bytes", type=int, default=1 << 20, help="larger request bodies answer 413")
    bench = sub.add_parser("bench", help="measure decoding: TTFT, TPOT, tokens/s, acceptance, cost")
    bench.add_argument("what", choices=["decode"])
    bench.add_argument("--checkpoint", default=None, help="a workdir or HF directory (default: random weights)")
    bench.add_argument("--config", default=DEFAULT_CONFIG, help="model config for random weights")
    bench.add_argument("--draft", default=None)
    bench.add_argument("--speculate-k", type=int, default=4)
    bench.add_argument("--batch", type=int, default=1)
    bench.add_argument("--prompt-len", type=int, default=128)
    bench.add_argument("--new-tokens", type=int, default=128)
    bench.add_argument("--cache-dtype", default="float32", choices=["float32", "bfloat16", "int8"])
    bench.add_argument("--price-per-hour", type=float, default=None, help="$/hour of the machine")
    bench.add_argument("--repeats", type=int, default=3)
    cc = sub.add_parser("compile-check", help="compile the train step for a TPU topology (no TPU needed): "
                                              "per-chip memory from XLA vs the estimate, FLOPs per step")
    cc.add_argument("--config", default=DEFAULT_CONFIG, help="config file, path.py[:arg]")
    cc.add_argument("--topology", required=True, help="e.g. v5e:2x2, v5p:4x4x4, v6e:4x4 (needs the tpu extra)")
    cc.add_argument("--json", action="store_true")
    est = sub.add_parser("estimate", help="memory, fit, ZeRO stages, KV cache, roofline and cost of a config")
    est.add_argument("--config", default=DEFAULT_CONFIG, help="config file, path.py[:arg]")
    est.add_argument("--chip", default="v5p", help="v4 v5e v5p v6e a100-40gb a100-80gb h100 h200 cpu")
    est.add_argument("--chips", type=int, default=8, help="chips to shard training state over")
    est.add_argument("--context", type=int, default=4096, help="tokens per sequence for the KV cache / decode")
    est.add_argument("--batch", type=int, default=8, help="sequences decoded together")
    est.add_argument("--price", type=float, default=None, help="$ per chip-hour (default: the chip table's)")
    est.add_argument("--tokens-per-s", type=float, default=None, help="measured decode rate (default: roofline)")
    est.add_argument("--ops", action="store_true", help="print the roofline's per-op tables")
    est.add_argument("--json", action="store_true", help="print JSON instead of tables")
    est.add_argument("--plot", default=None, metavar="PNG", help="draw the decode roofline to this PNG")
    return parser


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
    from tpustack.infer.decode import Generator
    from tpustack.infer.speculative import SpeculativeGenerator
    from tpustack.weights import load_weights

    cfg, params, tokenizer = load_weights(checkpoint)
    if draft is None:
        return tokenizer, Generator(cfg, params, cache_dtype, _eos(tokenizer))
    d_cfg, d_params, _ = load_weights(draft)
    return tokenizer, SpeculativeGenerator(cfg, params, cache_dtype, _eos(tokenizer), draft_cfg=d_cfg,
                                           draft_params=d_params, k=k)


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

    for path in export(args.checkpoint, args.format, args.out):
        print(path)
    return 0


def cmd_serve(args) -> int:
    try:
        import signal

        import uvicorn

        from tpustack.infer.server import Server, ServerConfig, create_app, load_chat_template
    except ImportError as e:
        raise UserError(f"serve: {e.name} is missing; pip install 'tpustack[serve]'") from None
    from tpustack.infer.engine import Engine, EngineConfig
    from tpustack.infer.runner import Runner
    from tpustack.weights import load_weights, weights_kind

    cfg, params, tok = load_weights(args.checkpoint)
    if tok is None:
        raise UserError(f"--checkpoint {args.checkpoint!r}: has no tokenizer; the server reads and writes text")
    template, bos, eos = (load_chat_template(args.checkpoint) if weights_kind(args.checkpoint) == "hf"
                          else (None, "", ""))
    draft = None
    if args.draft is not None:
        d = load_weights(args.draft)
        draft = (d.cfg, d.params)
    ecfg = EngineConfig(page_size=args.page_size, num_pages=args.num_pages, max_seqs=args.max_seqs,
                        token_budget=args.token_budget, cache_dtype=args.cache_dtype,
                        max_top_logprobs=0 if draft else args.max_top_logprobs)
    engine = Engine(cfg, params, ecfg, eos_id=_eos(tok), detokenize=tok.decode, draft=draft, k=args.speculate_k)
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


def cmd_bench(args) -> int:
    import numpy as np

    from tpustack.infer.bench import time_generation
    from tpustack.plan.cost import cost_per_million

    if args.checkpoint is None:
        from tpustack.config import load_config
        from tpustack.infer.decode import Generator
        from tpustack.weights import init_weights

        cfg, params, _ = init_weights(load_config(args.config).model)
        gen = Generator(cfg, params, args.cache_dtype)
    else:
        _, gen = _generator(args.checkpoint, args.draft, args.speculate_k, args.cache_dtype)
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


def cmd_compile_check(args, overrides) -> int:
    import json

    from tpustack.config import load_config
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
    print(f"FLOPs per step per chip: {r['flops_per_step_per_chip']:.3e}")
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
    spec = chip(args.chip)
    result = report(config, spec, args.chips, args.context, args.batch, args.price, args.tokens_per_s)
    if args.plot:
        plot(config, spec, args.context, args.batch, args.plot)
        result["plot"] = args.plot
    print(json.dumps(result, indent=1) if args.json else render(result, args.ops))
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
    # libtpu (the tpu extra, installed for ahead-of-time compiles) prints start-up errors on a
    # machine without a TPU: with JAX_PLATFORMS unset jax initialises every registered backend,
    # and its TPU backend loads libtpu, which looks for TPU metadata and peers before jax falls
    # back to cpu; compile-check loads it too. Where no TPU is visible (jax's own test: a Google
    # PCI device; /dev/accel* on v4/v5p, /dev/vfio/N on v5e/v6e), tell libtpu this host is alone
    # (virtual topologies and their compiles are unchanged; several processes may load it), and
    # with no GPU either choose cpu, before jax is imported. What the user set (JAX_PLATFORMS
    # even empty) is kept.
    if (sys.platform.startswith("linux") and "JAX_FORCE_TPU_INIT" not in os.environ
            and importlib.util.find_spec("libtpu") is not None):
        tpu = bool(glob.glob("/dev/accel*")) or any(not n.endswith("/vfio") for n in glob.glob("/dev/vfio/*"))
        for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
            try:
                with open(vendor) as f:
                    tpu = tpu or f.read().strip() == "0x1ae0"  # Google's PCI vendor id
            except OSError:
                pass
        if not tpu:
            os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
            os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")
            os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # its lockfile guards chips this host lacks
            if not any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")):
                os.environ.setdefault("JAX_PLATFORMS", "cpu")
    _quiet_library_logs()
    try:
        from tpustack.distributed import initialize

        initialize()  # multi-host: before anything touches a device
        rest, overrides = split_overrides(argv)
        args = _parser().parse_args(rest)
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
        if args.command == "bench":
            return cmd_bench(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "export":
            return cmd_export(args)
        return cmd_generate(args)  # generate, or its alias sample
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
