"""The `tpustack` argument parser (argparse only: importing it loads no jax)."""

from __future__ import annotations

import argparse
import os

from tpustack.commands import command_modules
from tpustack.errors import UserError

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "tiny.py")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise UserError(f"{self.prog}: {message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    """The `tpustack` parser: one subcommand per job."""
    parser = _Parser(prog="tpustack", description="Train and sample Llama-family models with JAX.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _training_commands(sub)
    _weights_commands(sub)
    _measuring_commands(sub)
    for name, module in command_modules().items():  # tpustack/commands/*.py
        module.add_arguments(sub.add_parser(name, help=module.HELP))
    return parser


def _training_commands(sub) -> None:
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


def _weights_commands(sub) -> None:
    """Commands that need only weights (through tpustack.weights.load_weights)."""
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
    exp.add_argument("--format", required=True, help="hf | the formats in tpustack.export.EXPORTERS")
    exp.add_argument("--type", default=None, help="the tensor type where the format has several (gguf: "
                     "f32 | f16 | q8_0 | q4_0 | q4_k)")
    exp.add_argument("--out", required=True, help="a new directory (a file for gguf), local or gs://")
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


def _measuring_commands(sub) -> None:
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
    est.add_argument("--time", action="store_true", help="predicted train step time and MFU of the config's layout "
                     "on --chips x --chip (compute, memory, collectives)")
    est.add_argument("--suggest", action="store_true", help="rank layouts (data/fsdp/tensor/stage, ZeRO, remat, "
                     "batch) for --chips x --chip by predicted step time; the best 3 with memory, MFU, a command")
    est.add_argument("--topology", default=None, help="the TPU slice for --time / --suggest, e.g. v5p:4x4x4 "
                     "(default: a near-cubic one of --chips)")
