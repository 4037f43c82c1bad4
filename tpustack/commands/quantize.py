"""`tpustack quantize`: weight-only quantization of a checkpoint (tpustack.compress.quantize)."""

from __future__ import annotations

import argparse

HELP = "quantize a checkpoint's weights (int8, RTN, GPTQ, AWQ, NF4) into a directory load_weights reads"
METHODS = ("int8", "rtn4", "rtn", "gptq", "awq", "nf4")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a tpustack workdir or HF directory (local or gs://)")
    parser.add_argument("--method", required=True, choices=METHODS,
                        help="int8 (per channel) | rtn4/rtn (round to nearest) | gptq | awq | nf4")
    parser.add_argument("--bits", type=int, default=4, choices=(3, 4), help="rtn/gptq/awq code bits (default 4)")
    parser.add_argument("--group", type=int, default=128, help="input rows per scale and zero point (default 128)")
    parser.add_argument("--calib", type=int, default=128,
                        help="calibration sequences of held-out text for gptq/awq (default 128)")
    parser.add_argument("--act-order", action="store_true", help="gptq: quantize rows by decreasing H diagonal")
    parser.add_argument("--awq-clip", action="store_true",
                        help="awq: also the paper's weight-clipping search (raises small_12m's loss: docs/compression.md)")
    parser.add_argument("--seed", type=int, default=0, help="calibration sample seed")
    parser.add_argument("--out", required=True, help="the output directory (local or gs://); must be empty")


def run(args: argparse.Namespace) -> int:
    from tpustack import paths
    from tpustack.compress.quantize import quantize_checkpoint
    from tpustack.errors import UserError

    if args.group not in (32, 64, 128, 256):
        raise UserError(f"--group {args.group}: must be 32, 64, 128 or 256")
    if args.calib < 1:
        raise UserError(f"--calib {args.calib}: must be >= 1")
    if paths.exists(args.out) and paths.find(args.out):
        raise UserError(f"--out {args.out!r}: not empty; choose a new directory")
    method = "rtn" if args.method == "rtn4" else args.method
    try:
        info = quantize_checkpoint(args.checkpoint, args.out, method, args.bits, args.group, args.calib,
                                   args.act_order, args.seed, awq_clip=args.awq_clip)
    except ValueError as e:  # a shape the method cannot take (group vs. widths)
        raise UserError(f"--group {args.group}: {e}") from e
    bits = "" if method in ("int8", "nf4") else f" {args.bits}-bit g{args.group}"
    print(f"{args.method}{bits}: {info['bytes'] / 1e6:.2f} MB of params, "
          f"{8 * info['matmul_bytes_per_weight']:.3f} bits per matmul weight -> {args.out}")
    return 0
