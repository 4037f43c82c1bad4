"""Published MaxText training runs beside tpustack's predicted step time for the same job.

Rows: MaxText's docs/reference/models/tiering.md (AI-Hypercomputer/maxtext @ e591f30, the
"Optimized models tiering" tables: model, chips, sequence length, MFU, tokens/s/device) with
the per-device batch, remat and sharding of the recipe each row links to
(benchmarks/maxtext_trillium_model_configs.py, src/maxtext/configs/tpu/v5p/llama2_70b.sh).
Each is predicted for tpustack's own program (configs/ shapes, fp32 master + bf16 compute,
ZeRO-3 FSDP over every chip, the Pallas flash kernel, the remat policy that saves what
MaxText's saves) with tpustack.plan.steptime. Where that program does not fit the chip's HBM
at MaxText's batch (MaxText offloads saved activations to host memory; ours keeps them in
HBM), ours is the fastest layout per token that fits (`our_layout`: another remat policy or
fewer sequences per chip), and the row says so:

- analytic: at the published size (no compile);
- hlo (--compile): the real TPU compiler's program for a proxy with the same per-chip
  shapes (width, heads, batch per chip, sequence) but 2 and 4 layers on an 8-chip slice
  (a 256-chip 80-layer compile does not finish on this machine), priced on the row's own
  topology; the time per layer and outside the layers are read off the two depths and
  extrapolated to the full depth.

MaxText counts causal attention at half its FLOPs (tiering.md note [2]); tpustack.metrics
does not. To compare like with like the predicted MFU here is the published MFU scaled by
predicted / published tokens per second per chip (the same FLOPs per token on both sides).

    nice -n 10 python benchmarks/maxtext_published.py [--compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

OUT = "benchmarks/results/maxtext_published.json"
L70 = {"model.d_model": "8192", "model.num_layers": "80", "model.num_heads": "64", "model.num_kv_heads": "8",
       "model.ffn_dim": "28672"}
# (row, published MFU, published tokens/s/chip, chip, chips, config, overrides, MaxText's remat)
ROWS = [
    ("Llama 2 70B, v5p-512, SL 4096, batch 4/chip", 0.654, 692, "v5p", 512, "configs/llama2_13b.py",
     {**L70, "train.seq_len": "4096", "model.max_seq_len": "4096"}, 4, "save_dot_except_mlpwi"),
    ("Llama 2 70B, v6e-256, SL 4096, batch 4/chip", 0.438, 900, "v6e", 256, "configs/llama2_13b.py",
     {**L70, "train.seq_len": "4096", "model.max_seq_len": "4096"}, 4, "full"),
    ("Llama 3.1 8B, v6e-256, SL 8192, batch 4/chip", 0.4546, 7207, "v6e", 256, "configs/llama3_8b.py",
     {"train.seq_len": "8192", "model.max_seq_len": "8192"}, 4, "custom (offload)"),
    ("Llama 3.1 70B, v6e-256, SL 8192, batch 5/chip", 0.5033, 960, "v6e", 256, "configs/llama3_8b.py",
     {**L70, "train.seq_len": "8192", "model.max_seq_len": "8192"}, 5, "custom (offload)"),
]
# MaxText's remat -> the policy of ours that saves the same values (tpustack.remat); MaxText's
# `custom` offloads its saved values to host memory, ours keeps them in HBM
REMAT = {"full": "nothing_saveable", "save_dot_except_mlpwi": "save_dots_except_mlp_in",
         "custom (offload)": "save_qkv_proj"}


def our_config(path: str, overrides: dict, chips: int, per_chip: int, remat: str, layers: int | None = None,
               policy: str | None = None):
    from tpustack.config import load_config

    ov = {**overrides, "mesh.fsdp": "-1", "parallel.zero_stage": "3", "model.attention_impl": "pallas",
          "model.remat_policy": policy or REMAT[remat], "train.batch_size": str(per_chip * chips)}
    if layers:
        ov["model.num_layers"] = str(layers)
    return load_config(path, ov)


def our_layout(row) -> tuple[int, str, dict, float]:
    """(batch per chip, remat, tpustack.plan.suggest.evaluate's prediction, the recipe's own
    bytes per chip) of our program for the row: MaxText's batch and remat where our estimate
    fits the chip's HBM (suggest's margin), else the fastest per token that fits among our
    remat policies and smaller batches (MaxText offloads saved activations to host memory;
    our program keeps them in HBM)."""
    from tpustack.plan import steptime, suggest
    from tpustack.plan.chips import CHIPS

    name, mfu, tps, chip, chips, path, ov, per_chip, remat = row
    mesh = {"data": 1, "stage": 1, "fsdp": chips, "tensor": 1}
    ours = REMAT[remat]
    topology = steptime.default_topology(chip, chips)
    cap = suggest.HBM_MARGIN * CHIPS[chip].hbm_bytes
    tried = {}
    for policy in dict.fromkeys((ours, *suggest.REMATS)):
        for b in range(per_chip, 0, -1):
            cfg = our_config(path, ov, chips, b, remat, policy=policy)
            cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **mesh))  # fsdp -1 resolved
            tried[b, policy] = suggest.evaluate(cfg, chip, topology)
    recipe = tried[per_chip, ours]["memory_bytes"]
    fits = [(r["seconds_per_token"], b, p) for (b, p), r in tried.items() if r["memory_bytes"] <= cap]
    b, p = (per_chip, ours) if recipe <= cap or not fits else min(fits)[1:]
    return b, p, tried[b, p], recipe


def predict(row) -> dict:
    name, mfu, tps, chip, chips, path, ov, per_chip, remat = row
    batch, policy, ours, recipe = our_layout(row)
    ours_tps = 1 / (ours["seconds_per_token"] * chips)
    return {"row": name, "published_mfu": mfu, "published_tokens_per_s_chip": tps, "chip": chip, "chips": chips,
            "remat_maxtext": remat, "remat_ours": policy, "batch_per_chip_ours": batch,
            "memory_gb": ours["memory_bytes"] / 1e9, "recipe_memory_gb": recipe / 1e9,
            "analytic": {**ours["step"], "tokens_per_s_chip": ours_tps, "mfu_maxtext_count": mfu * ours_tps / tps}}


def proxy_hlo_path(layers: int) -> str:
    import tempfile

    return os.path.join(tempfile.gettempdir(), f"maxtext_proxy_{layers}.hlo.gz")


def hlo_proxy(row, per_chip: int, policy: str, depths=(2, 4), proxy_chips: int = 8, compile_: bool = True) -> dict:
    """The HLO-based prediction of a row: two shallow compiles with the row's per-chip shapes
    on a `proxy_chips` slice (kept as /tmp/maxtext_proxy_L.hlo.gz; compile_=False reprices
    the kept ones), priced on the row's own topology (its ICI rings), and extrapolated per
    layer to the full depth."""
    import gzip

    from tpustack.plan import steptime
    from tpustack.train.aot import compile_check

    name, mfu, tps, chip, chips, path, ov, _, remat = row
    topo, target = steptime.default_topology(chip, proxy_chips), steptime.default_topology(chip, chips)
    got = {}
    for layers in depths:
        cfg = our_config(path, ov, proxy_chips, per_chip, remat, layers, policy)
        if compile_:
            r = compile_check(cfg, topo, hlo_path=proxy_hlo_path(layers))
            if not r["compiled"]:
                return {"topology": topo, "error": r.get("xla_error", "did not compile")}
        with gzip.open(proxy_hlo_path(layers), "rt") as f:
            got[layers] = steptime.from_hlo(f.read(), cfg, target, proxy_chips).as_dict()
    full = int(our_config(path, ov, chips, per_chip, remat, policy=policy).model.num_layers)
    a, b = depths
    out = {}
    for k in ("step_s", "compute_s", "memory_s", "collective_s", "exposed_collective_s"):
        per_layer = (got[b][k] - got[a][k]) / (b - a)
        out[k] = got[a][k] + (full - a) * per_layer
    seq = int(ov["train.seq_len"])
    ours_tps = per_chip * seq / out["step_s"]
    return {"compiled_on": topo, "priced_on": target, "depths": got, **out, "tokens_per_s_chip": ours_tps,
            "mfu_maxtext_count": mfu * ours_tps / tps}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--compile", action="store_true", help="also the HLO-based prediction (slow)")
    ap.add_argument("--only", default="", help="substring of the row names")
    ap.add_argument("--reprice", action="store_true", help="the HLO-based prediction from the kept proxy HLO")
    args = ap.parse_args()
    old = {}
    if os.path.exists(OUT):
        old = {r["row"]: r for r in json.load(open(OUT))}
    rows = []
    for row in ROWS:
        if args.only and args.only not in row[0]:
            if row[0] in old:
                rows.append(old[row[0]])
            continue
        r = predict(row)
        if args.compile or args.reprice:
            r["hlo"] = hlo_proxy(row, r["batch_per_chip_ours"], r["remat_ours"], compile_=args.compile)
        elif "hlo" in old.get(row[0], {}):
            r["hlo"] = old[row[0]]["hlo"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    print("| run (MaxText) | published MFU | ours: batch/chip, remat, GB/chip | predicted MFU, analytic | ratio "
          "| predicted MFU, our HLO | ratio |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["analytic"]["mfu_maxtext_count"]
        h = r.get("hlo", {}).get("mfu_maxtext_count")
        hs = f"{h:.1%} | {h / r['published_mfu']:.2f}" if h else "- | -"
        ours = f"{r.get('batch_per_chip_ours', '?')}, {r['remat_ours']}, {r['memory_gb']:.1f}"
        print(f"| {r['row']} | {r['published_mfu']:.1%} | {ours} | {a:.1%} | {a / r['published_mfu']:.2f} | {hs} |")
    with open(OUT, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
