"""`tpustack prune`: magnitude / Wanda / SparseGPT sparsity (unstructured or N:M), or structured
removal of heads and FFN channels, with an optional short fine-tune to recover.

    tpustack prune --checkpoint runs/small_12m --method wanda --pattern 2:4 --out runs/small_12m_24
    tpustack prune --checkpoint runs/small_12m --structured heads=2,ffn=0.25 --recover-steps 100 --out DIR

The output (local or gs://) is a params-only workdir that load_weights, eval, generate,
serve and export read; its config is the pruned model's. prune.json beside it records what
was removed, the sparsity, the parameter counts and the packed 2:4 size.
"""

from __future__ import annotations

import json

HELP = "prune a checkpoint (magnitude / wanda / sparsegpt, unstructured or 2:4, or whole heads and FFN channels)"


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a tpustack workdir or HF directory (local or gs://)")
    parser.add_argument("--method", choices=("magnitude", "wanda", "sparsegpt"), default=None,
                        help="how to choose the weights to zero (with --sparsity or --pattern)")
    parser.add_argument("--sparsity", type=float, default=None, help="unstructured: the share of each linear to zero")
    parser.add_argument("--pattern", default=None, help="N:M sparsity, e.g. 2:4 (N kept of every M inputs)")
    parser.add_argument("--structured", default=None,
                        help="heads=N,ffn=FRACTION: remove N query heads and FRACTION of the FFN channels per block")
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences (held-out text, seeded)")
    parser.add_argument("--calib-len", type=int, default=0, help="calibration sequence length (0: train.seq_len)")
    parser.add_argument("--recover-steps", type=int, default=0, help="fine-tune steps after pruning (0: none)")
    parser.add_argument("--recover-lr", type=float, default=3e-4, help="peak learning rate of the fine-tune")
    parser.add_argument("--out", required=True, help="the new workdir (local or gs://; must not exist or be empty)")


def _check(args) -> None:
    from tpustack import paths
    from tpustack.compress.prune import parse_pattern
    from tpustack.compress.structured import parse_structured
    from tpustack.errors import UserError

    if args.structured is not None:
        if args.method or args.sparsity is not None or args.pattern:
            raise UserError("--structured: give it alone, without --method / --sparsity / --pattern")
        try:
            parse_structured(args.structured)
        except ValueError as e:
            raise UserError(f"--structured {args.structured!r}: {e}") from None
    else:
        if args.method is None:
            raise UserError("--method: needed (magnitude, wanda or sparsegpt), or pass --structured heads=N,ffn=F")
        if (args.sparsity is None) == (args.pattern is None):
            raise UserError("--sparsity / --pattern: give exactly one, e.g. --sparsity 0.5 or --pattern 2:4")
        if args.sparsity is not None and not 0.0 < args.sparsity < 1.0:
            raise UserError(f"--sparsity {args.sparsity}: must be between 0 and 1 (exclusive)")
        if args.pattern is not None:
            try:
                parse_pattern(args.pattern)
            except ValueError:
                raise UserError(f"--pattern {args.pattern!r}: expected N:M with 0 < N < M, e.g. 2:4") from None
    for flag in ("calib", "recover_steps", "calib_len"):
        if getattr(args, flag) < (1 if flag == "calib" else 0):
            raise UserError(f"--{flag.replace('_', '-')}={getattr(args, flag)}: must be >= {int(flag == 'calib')}")
    if paths.isfile(args.out) or (paths.isdir(args.out) and paths.find(args.out)):
        raise UserError(f"--out {args.out!r}: exists and is not empty; pass a new directory")


def run(args) -> int:
    _check(args)
    from tpustack import paths
    from tpustack.compress import prune, pruned, structured
    from tpustack.compress.sweep import calibration_tokens
    from tpustack.errors import UserError
    from tpustack.metrics import Progress
    from tpustack.weights import load_weights, source_config

    cfg, params, _ = load_weights(args.checkpoint)
    config = source_config(args.checkpoint, cfg)
    params = pruned.as_numpy(params)
    record: dict = {"source": args.checkpoint, "params_before": cfg.num_params()}
    needs_calib = args.structured is not None or args.method != "magnitude"
    tokens = calibration_tokens(config, args.calib, args.calib_len or config.train.seq_len) if needs_calib else None
    bar = Progress(total=cfg.num_layers, initial=0, desc="prune")
    masks = None
    if args.structured is not None:
        spec = structured.parse_structured(args.structured)
        try:
            new_cfg = structured.pruned_config(cfg, spec)
        except ValueError as e:
            raise UserError(f"--structured {args.structured!r}: {e}") from None
        new_cfg, params, kept = structured.prune_structured(cfg, params, tokens, spec, lambda i: bar.update(1))
        record.update(structured=args.structured, num_heads=new_cfg.num_heads, num_kv_heads=new_cfg.num_kv_heads,
                      ffn_dim=new_cfg.ffn_dim, kept_heads=[k["heads"].tolist() for k in kept])
        suffix = f"_pruned_{args.structured}"
    else:
        new_cfg, pattern = cfg, prune.parse_pattern(args.pattern) if args.pattern else None
        params, masks = prune.prune_model(cfg, params, tokens, args.method, args.sparsity, pattern,
                                          lambda i: bar.update(1))
        record.update(method=args.method, sparsity=args.sparsity, pattern=args.pattern)
        if pattern == (2, 4):
            record["packed_2to4_bits_per_weight"] = prune.packed_bits_per_weight(new_cfg, params)
        suffix = f"_{args.method}_{args.pattern or args.sparsity}"
    bar.close()
    out_config = pruned.with_model(config, new_cfg, suffix)
    if args.recover_steps:
        params, losses = pruned.recover(out_config, params, args.recover_steps, args.recover_lr, masks,
                                        log_every=max(1, args.recover_steps // 10))
        params = pruned.as_numpy(params)
        record.update(recover_steps=args.recover_steps, recover_lr=args.recover_lr, recover_last_loss=losses[-1])
    record.update(prune.sparsity_report(new_cfg, params), params_after=new_cfg.num_params())
    pruned.save_workdir(args.out, out_config, params, step=args.recover_steps)
    paths.write_text(paths.join(args.out, "prune.json"), json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}: {record['params_after'] / 1e6:.2f}M params, "
          f"{record['linear_sparsity']:.1%} of the block linears zero")
    return 0

