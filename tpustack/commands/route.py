"""`tpustack route`: answer prompts with a small local model when it is confident over its
first tokens, else forward them to an OpenAI-compatible endpoint (chapter 30.6's hybrid).

    tpustack route --checkpoint runs/tiny --cloud http://127.0.0.1:8000/v1 --threshold 0.6 \\
        --prompt 'def main():' [--prompt ...] [--prompts-file FILE] [--measure max_prob|entropy] [--json]

--checkpoint is read by load_weights (a workdir, HF directory, orbax export or .gguf; local
or gs://); --cloud is `tpustack serve` or llama.cpp's server (their /v1/completions, at
temperature 0). Prints each answer, or with --json one line per prompt: text, where
(local | cloud), confidence, probe and total seconds. The logic is tpustack.infer.router;
benchmarks/router.py sweeps the threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from tpustack.errors import UserError

HELP = "answer with a small local model when it is confident, else forward to an OpenAI-compatible server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the local model: workdir, HF dir, orbax export, "
                        ".gguf (local or gs://)")
    parser.add_argument("--cloud", required=True, help="the big model's OpenAI-compatible base URL, e.g. "
                        "http://127.0.0.1:8000/v1 (tpustack serve, llama.cpp's server)")
    parser.add_argument("--cloud-model", default="", help="model id sent to --cloud (default: its /v1/models first)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    parser.add_argument("--cloud-extra", default=None, help="JSON object of more request fields; llama.cpp's "
                        "server penalizes repeats even at temperature 0: '{\"repeat_penalty\": 1.0}' makes it greedy")
    parser.add_argument("--threshold", type=float, required=True,
                        help="answer locally when confidence >= this (max_prob: 0..1; entropy: -nats)")
    parser.add_argument("--measure", default="max_prob", help="max_prob | entropy")
    parser.add_argument("--probe-tokens", type=int, default=8, help="tokens the confidence is measured over")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts-file", default=None, help="one JSON string per line (local or gs://)")
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt")


def run(args) -> int:
    from tpustack import paths
    from tpustack.infer.router import Cloud, LocalModel, RouteConfig, Router
    from tpustack.weights import load_weights

    prompts = list(args.prompt)
    if args.prompts_file:
        if not paths.isfile(args.prompts_file):
            raise UserError(f"--prompts-file {args.prompts_file!r}: no such file")
        prompts += [json.loads(line) for line in paths.read_text(args.prompts_file).splitlines() if line.strip()]
    if not prompts:
        raise UserError("--prompt: give at least one prompt (or --prompts-file)")
    try:
        extra = json.loads(args.cloud_extra) if args.cloud_extra else {}
    except json.JSONDecodeError as e:
        raise UserError(f"--cloud-extra: not JSON ({e}); e.g. '{{\"repeat_penalty\": 1.0}}'") from None
    if not isinstance(extra, dict):
        raise UserError("--cloud-extra: must be a JSON object, e.g. '{\"repeat_penalty\": 1.0}'")
    rcfg = RouteConfig(args.threshold, args.measure, args.probe_tokens, args.max_tokens)
    rcfg.check()
    router = Router(LocalModel(*load_weights(args.checkpoint)), Cloud(args.cloud, args.cloud_model, args.api_key, extra=extra),
                    rcfg)
    for prompt in prompts:
        routed = router.route(prompt)
        if args.json:
            print(json.dumps({"prompt": prompt, **dataclasses.asdict(routed)}), flush=True)
        else:
            print(f"[{routed.where} {args.measure}={routed.confidence:.3f}] {prompt}{routed.text}", flush=True)
    print(f"{len(prompts)} prompts routed", file=sys.stderr)
    return 0
