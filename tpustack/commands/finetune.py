"""`tpustack finetune`: LoRA / QLoRA adapters on a frozen base (tpustack.compress.finetune)."""

from __future__ import annotations

import argparse

HELP = "fine-tune LoRA adapters on a frozen (optionally NF4) base; merge them, export them for peft"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="the base: a tpustack workdir or HF directory (or gs://)")
    parser.add_argument("--workdir", "--out", dest="workdir", required=True,
                        help="where the adapters' checkpoints and lora.json go (resumes if it holds some)")
    parser.add_argument("--lora-rank", type=int, default=8, help="adapter rank r (default 8)")
    parser.add_argument("--lora-alpha", type=float, default=16.0, help="the update is scaled by alpha / r")
    parser.add_argument("--targets", default="q,k,v,o,gate,up,down",
                        help="comma-separated linears to adapt (default: all of them, as QLoRA)")
    parser.add_argument("--base-quant", choices=("none", "nf4"), default="none",
                        help="nf4: hold the frozen base as NF4 and expand it inside each matmul (QLoRA)")
    parser.add_argument("--data", default="builtin-other",
                        help="builtin-other (the stdlib's .txt/.rst/.html, text the base did not see) or text "
                             "files: a file, directory or glob (.txt/.md/.py), local or gs://")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--merge-out", default="", help="also write the merged plain checkpoint (a workdir) here")
    parser.add_argument("--peft-out", default="",
                        help="also write adapter_config.json + adapter_model.safetensors (peft's format) here")


def run(args: argparse.Namespace) -> int:
    from tpustack.compress.finetune import FinetuneOptions, describe, finetune
    from tpustack.errors import UserError

    if args.lora_rank < 1:
        raise UserError(f"--lora-rank {args.lora_rank}: must be >= 1")
    if args.steps < 1:
        raise UserError(f"--steps {args.steps}: must be >= 1")
    opts = FinetuneOptions(checkpoint=args.checkpoint, workdir=args.workdir, rank=args.lora_rank,
                           alpha=args.lora_alpha, targets=args.targets, base_quant=args.base_quant, data=args.data,
                           steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                           seed=args.seed, merge_out=args.merge_out, peft_out=args.peft_out)
    print(describe(finetune(opts)))
    return 0
