"""`tpustack estimate`: the whole capacity report of one config on one chip type, as a dict and as text."""

from __future__ import annotations

from typing import Any

from tpustack.config import Config
from tpustack.plan import cost, memory, roofline
from tpustack.plan.chips import Chip

GB = 1e9


def report(config: Config, chip: Chip, chips: int, context: int, batch: int,
           price: float | None = None, tokens_per_s: float | None = None) -> dict[str, Any]:
    """Every figure of the estimate, in bytes / seconds / dollars, JSON-able."""
    m, t = config.model, config.train
    params = m.num_params()
    weights = {f: memory.weight_bytes_for(m, f) for f in ("fp32", "bf16", "int8", "int4", "nf4")}
    kv = {d: {"per_sequence": memory.kv_cache_bytes(m, context, 1, d),
              "per_batch": memory.kv_cache_bytes(m, context, batch, d)} for d in ("bf16", "int8")}

    def train(n: int, stage: int, remat: str) -> memory.TrainMemory:
        return memory.train_memory(m, t.precision, {"data": 1, "fsdp": n, "tensor": 1}, stage,
                                   max(t.batch_size, n), t.seq_len, remat)

    zero = []
    for stage in range(4):
        ours = {r: train(chips, stage, r) for r in ("none", "nothing_saveable")}
        zero.append({"stage": stage, "chapter": memory.zero_chapter(params, chips, stage),
                     "master": ours["none"].master, "grads": ours["none"].grads, "adam": ours["none"].adam,
                     "compute_copy": ours["none"].compute_copy,
                     "activations_none": ours["none"].activations,
                     "activations_nothing_saveable": ours["nothing_saveable"].activations,
                     "total": ours[m.remat_policy if m.remat_policy == "none" else "nothing_saveable"].total})
    remat = "none" if m.remat_policy == "none" else "nothing_saveable"
    cap = chip.hbm_bytes
    fewest = {
        "train_zero3": memory.min_chips(lambda n: train(n, 3, remat).total, cap),
        "serve_bf16": memory.min_chips(lambda n: (weights["bf16"] + kv["bf16"]["per_batch"]) / n, cap),
        "serve_int8": memory.min_chips(lambda n: (weights["int8"] + kv["int8"]["per_batch"]) / n, cap),
    }
    fits = {f"fits({p}, {b}, {n})": memory.fits(p, b, n) for p, b, n in ((13, 2, 1), (13, 16, 1), (13, 16, 4))}
    gb = params / 1e9
    fits[f"fits({gb:.1f}, 2, 1, {cap / GB:.0f})"] = memory.fits(gb, 2, 1, cap / GB)
    fits[f"fits({gb:.1f}, 16, {chips}, {cap / GB:.0f})"] = memory.fits(gb, 16, chips, cap / GB)

    cpu = chip.name == "cpu"  # XLA CPU is fastest in f32 (converts do not fuse into dots)
    act = "fp32" if cpu else "bf16"
    # the XLA attention path (CPU) copies K and V head-major every layer; the decode kernel does not
    dec = {w: roofline.predict(roofline.decode_ops(m, batch, context, w, "int8" if w == "int8" else act, act,
                                                   kv_copies=1 if cpu else 0),
                               chip, batch) for w in (("fp32",) if cpu else ("bf16", "int8"))}
    per_chip = max(1, t.batch_size // chips)
    trn = roofline.predict(roofline.train_ops(m, per_chip, t.seq_len, "float32" if cpu else "bfloat16"),
                           chip, per_chip * t.seq_len)
    price = chip.dollars_per_hour if price is None else price
    base = "fp32" if cpu else "bf16"
    rate = tokens_per_s or dec[base].predicted_tokens_per_s
    costs = {"dollars_per_hour": price, "tokens_per_s": rate,
             "source": "given" if tokens_per_s else "roofline prediction",
             "per_million": cost.cost_per_million(price, rate) if price else None}
    if "int8" in dec and price:
        costs["per_million_int8"] = cost.cost_per_million(
            price, dec["int8"].predicted_tokens_per_s * rate / dec[base].predicted_tokens_per_s)

    def ops(pred: roofline.Prediction) -> list[dict]:
        return [{"name": o.name, "kind": o.kind, "count": o.count, "flops": o.flops, "bytes": o.bytes,
                 "intensity": o.intensity, "bound": roofline.bound(o, chip),
                 "achievable_flops": roofline.achievable(o.intensity, chip.peak_flops, chip.hbm_bandwidth),
                 "seconds": roofline.op_time(o, chip), "kernels": o.kernels,
                 "predicted_seconds": roofline.op_predicted(o, chip)} for o in pred.ops]

    return {
        "config": config.name, "params": params, "chip": chip.name, "chips": chips, "context": context,
        "batch": batch, "precision": t.precision, "remat_policy": m.remat_policy,
        "train_batch": t.batch_size, "train_seq_len": t.seq_len, "hbm_bytes": cap,
        "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth,
        "stream": [list(x) for x in chip.stream], "op_latency": chip.op_latency,
        "break_even": roofline.break_even(chip.peak_flops, chip.hbm_bandwidth),
        "weights": weights, "kv_cache": kv, "zero": zero, "fewest_chips": fewest, "fits": fits,
        "decode": {w: {"seconds": p.seconds, "tokens_per_s": p.tokens_per_s, "mfu_ceiling": p.mfu(chip),
                       "predicted_seconds": p.predicted_seconds, "predicted_tokens_per_s": p.predicted_tokens_per_s,
                       "kernels": sum(o.count * o.kernels for o in p.ops),
                       "bytes": sum(o.count * o.bytes for o in p.ops),
                       "stream_seconds": sum(roofline.op_stream_time(o, chip) for o in p.ops),
                       "ops": ops(p)} for w, p in dec.items()},
        "train_step": {"seconds": trn.seconds, "tokens_per_s_per_chip": trn.tokens_per_s,
                       "mfu_ceiling": trn.mfu(chip), "ops": ops(trn)},
        "cost": costs,
    }


def _g(x: float) -> str:
    return f"{x / GB:8.2f} GB"


def render(r: dict[str, Any], show_ops: bool = False) -> str:
    """The report as a terminal table."""
    L = [f"{r['config']}: {r['params'] / 1e9:.2f}B params on {r['chips']} x {r['chip']} "
         f"({r['hbm_bytes'] / GB:.0f} GB, {r['peak_flops'] / 1e12:.0f} TFLOP/s, "
         f"{r['hbm_bandwidth'] / 1e9:.0f} GB/s; break-even {r['break_even']:.0f} FLOP/byte)"]
    if r["stream"]:
        L.append("  cold stream by bytes per op: " + ", ".join(
            f"{s / 2**20:g} MiB {b / 1e9:.1f} GB/s" for s, b in r["stream"])
            + f"; op latency {r['op_latency'] * 1e6:.2f} us")
    L += ["", "weights"]
    L += [f"  {f:5s} {_g(b)}" for f, b in r["weights"].items()]
    L += ["", f"KV cache at {r['context']} tokens (GQA-aware)    per sequence     batch {r['batch']}"]
    L += [f"  {d:5s}                              {_g(v['per_sequence'])}   {_g(v['per_batch'])}"
          for d, v in r["kv_cache"].items()]
    L += ["", f"training state per device over {r['chips']} chips ({r['precision']}, batch "
          f"{r['train_batch']} x {r['train_seq_len']}; ours: fp32 master + fp32 grads + fp32 Adam mu/nu)",
          "  ZeRO  chapter 16B/param   master      grads       adam        bf16 copy   acts(none)  "
          "acts(nothing_saveable)  total"]
    for z in r["zero"]:
        L.append(f"  {z['stage']}     {_g(z['chapter'])}     " + " ".join(
            _g(z[k]) for k in ("master", "grads", "adam", "compute_copy", "activations_none",
                               "activations_nothing_saveable")) + f"  {_g(z['total'])}")
    fc = r["fewest_chips"]
    name = lambda n: "none up to 65536" if n is None else str(n)  # noqa: E731
    L += ["", f"fewest {r['chip']} chips: train (ZeRO-3, remat {r['remat_policy']}) {name(fc['train_zero3'])}; "
          f"serve bf16 {name(fc['serve_bf16'])}; serve int8 {name(fc['serve_int8'])}", "", "chapter fits():"]
    L += [f"  {k:28s} -> {v}" for k, v in r["fits"].items()]
    L.append("")
    for w, d in r["decode"].items():
        L.append(f"decode roofline ({w} weights, batch {r['batch']}, context {r['context']}): "
                 f"{d['seconds'] * 1e3:.2f} ms/step, {d['tokens_per_s']:.0f} tokens/s ceiling, MFU ceiling "
                 f"{d['mfu_ceiling']:.1%}")
        if r["op_latency"] or r["stream"]:
            L.append(f"  predicted: {d['predicted_seconds'] * 1e3:.2f} ms/step, {d['predicted_tokens_per_s']:.0f} "
                     f"tokens/s ({d['bytes'] / 1e6:.0f} MB streamed cold in {d['stream_seconds'] * 1e3:.2f} ms, "
                     f"{d['bytes'] / d['stream_seconds'] / 1e9:.1f} GB/s, + {d['kernels']} ops x "
                     f"{r['op_latency'] * 1e6:.2f} us)")
        else:
            L.append("  predicted: the ceiling (datasheet bandwidth; no per-op latency is modelled for this chip)")
    ts = r["train_step"]
    L.append(f"train-step roofline (per chip): {ts['seconds'] * 1e3:.1f} ms, {ts['tokens_per_s_per_chip']:.0f} "
             f"tokens/s/chip, MFU ceiling {ts['mfu_ceiling']:.1%}")
    if show_ops:
        for title, ops in [(f"decode ({w})", d["ops"]) for w, d in r["decode"].items()] + [("train", ts["ops"])]:
            L += ["", f"{title}: op                         x   GFLOP     MB    FLOP/B  bound    ms  predicted"]
            L += [f"  {o['name']:30s} {o['count']:3d} {o['flops'] / 1e9:8.2f} {o['bytes'] / 1e6:8.1f} "
                  f"{o['intensity']:8.1f}  {o['bound']:7s} {o['seconds'] * 1e3:7.3f} "
                  f"{o['predicted_seconds'] * 1e3:9.3f}"
                  for o in ops]
    c = r["cost"]
    L.append("")
    if c["per_million"] is None:
        L.append("cost: no price for this chip; pass --price DOLLARS_PER_HOUR")
    else:
        line = (f"cost: ${c['dollars_per_hour']:.2f}/chip-hour at {c['tokens_per_s']:.0f} tokens/s "
                f"({c['source']}) = ${c['per_million']:.3f} per million output tokens")
        if "per_million_int8" in c:
            line += f"; int8 weights + KV: ${c['per_million_int8']:.3f}"
        L.append(line)
    return "\n".join(L)


def plot(config: Config, chip: Chip, context: int, batch: int, path: str) -> None:
    """Draw the decode step's ops and a training step's ops on one chip's roofline."""
    m = config.model
    dtype = "fp32" if chip.name == "cpu" else "bf16"
    dec = roofline.decode_ops(m, batch, context, dtype, dtype, dtype)
    trn = roofline.train_ops(m, max(1, config.train.batch_size), config.train.seq_len,
                             "float32" if dtype == "fp32" else "bfloat16")
    ops = [roofline.Op(f"decode: {o.name}", o.kind, o.flops, o.bytes, o.count) for o in dec]
    ops += [roofline.Op(f"train: {o.name}", o.kind, o.flops, o.bytes, o.count) for o in trn]
    title = f"{config.name} on {chip.name}: decode (batch {batch}, context {context}) and a train step"
    roofline.plot(roofline.Prediction(ops, 0.0, 0, 0.0), chip, path, title)
