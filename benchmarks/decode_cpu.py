"""Decoding on CPU: tpustack vs transformers' generate() (PyTorch, KV cache on), side by side.

    python benchmarks/decode_cpu.py [--repeats 3] [--prompt-len 128 --new-tokens 128]

The same configs/bench_125m weights (f32, random, saved once as a Hugging Face checkpoint)
go into both. Batch 1, greedy: the tokens of every timed run must be identical, else the
script exits 1 naming the run and the first differing position. Both sides are timed the
same way: one warm-up run, then --repeats runs interleaved (tpustack, transformers, ...),
each giving TTFT (prefill + the first token) and TPOT = (end-to-end - TTFT) / (tokens - 1)
from the same run; every figure is the median over the repeats. Prints TTFT, TPOT and
tokens/s for both, the ratio, and the effective weight bandwidth (matmul weight bytes /
TPOT) against a streaming gemv measured in the same run (the memory roofline of
decoding), and the roofline's prediction of the decode step (tpustack.plan.roofline: every
byte the step touches at the measured cold-stream bandwidth plus the measured per-op
latency) against the measured TPOT; then TTFT at longer prompts and tokens/s at larger
batches. Writes JSON to benchmarks/results/decode_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from tpustack.machine import cpu_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def hf_generate(model, prompt_ids, new_tokens: int) -> dict:
    """One greedy transformers generate(), timed as tpustack.infer.bench.time_generation times
    ours: TTFT when the first token exists, TPOT = (end-to-end - TTFT) / (tokens - 1)."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Clock(StoppingCriteria):  # called once per generated token, right after it is appended
        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    clock = Clock()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, eos_token_id=None, pad_token_id=0,
                             stopping_criteria=StoppingCriteriaList([clock]))
        total = time.perf_counter() - start
    tokens = out[0, len(prompt_ids):].tolist()
    ttft = clock.times[0] - start
    return {"ttft_s": ttft, "tpot_s": (total - ttft) / max(len(tokens) - 1, 1), "e2e_s": total, "tokens": tokens}


def first_difference(ours: list[int], theirs: list[int]) -> str | None:
    """None when the token lists agree, else where and how they first differ."""
    if ours == theirs:
        return None
    i = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    a = ours[i] if i < len(ours) else "end"
    b = theirs[i] if i < len(theirs) else "end"
    return f"first at new token {i} of {max(len(ours), len(theirs))} (tpustack {a}, transformers {b})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "bench_125m.py"))
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ttft-lens", default="128,512,1024")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "decode_cpu.json"))
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax.linen import meta
    from transformers import LlamaForCausalLM

    from tpustack.config import load_config
    from tpustack.infer.bench import time_generation
    from tpustack.infer.decode import Generator, bucket
    from tpustack.interop.hf import save_hf_checkpoint
    from tpustack.model import Decoder
    from tpustack.plan import roofline
    from tpustack.plan.chips import measure_cpu_streams

    torch.set_num_threads(args.threads)
    cfg = load_config(args.config).model
    params = meta.unbox(Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"])
    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(tmp, jax.device_get(params), cfg)
        hf = LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32).eval()
    gen = Generator(cfg, params)
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, cfg.vocab_size, args.prompt_len).tolist()
    chip = measure_cpu_streams()
    # bytes a decode step must stream: every matmul weight (the embedding is a one-row gather)
    weight_bytes = 4 * (cfg.num_params() - cfg.vocab_size * cfg.d_model * (0 if cfg.tie_embeddings else 1))

    mismatches: list[str] = []

    def compare(what: str, ours_tokens: list[int], theirs_tokens: list[int]) -> None:
        why = first_difference(ours_tokens, theirs_tokens)
        if why:
            mismatches.append(f"{what}: {why}")
            print(f"TOKENS DIFFER, {what}: {why}", file=sys.stderr, flush=True)

    time_generation(gen, [prompt], args.new_tokens)  # warm-up (compiles)
    hf_generate(hf, prompt, args.new_tokens)  # warm-up, the same length
    ours, theirs = [], []
    for i in range(args.repeats):
        ours.append(time_generation(gen, [prompt], args.new_tokens))
        theirs.append(hf_generate(hf, prompt, args.new_tokens))
        compare(f"decode repeat {i + 1}", ours[-1]["tokens"][0], theirs[-1]["tokens"])
        print(f"repeat {i + 1}/{args.repeats}: tpustack {ours[-1]['e2e_s']:.2f}s, "
              f"transformers {theirs[-1]['e2e_s']:.2f}s", file=sys.stderr, flush=True)
    chip = max(chip, measure_cpu_streams.__wrapped__(), key=lambda c: c.hbm_bandwidth)
    # the roofline of one decode step as the generator runs it: attention reads the whole bucketed
    # cache, and the XLA CPU path copies K and V head-major once per layer
    cache_len = min(bucket(args.prompt_len + args.new_tokens), cfg.max_seq_len)
    pred = roofline.predict(roofline.decode_ops(cfg, 1, cache_len, "fp32", "fp32", "fp32", kv_copies=1), chip, 1)
    t_ttft = statistics.median(r["ttft_s"] for r in ours)
    t_tpot = statistics.median(r["tpot_s"] for r in ours)
    h_ttft = statistics.median(r["ttft_s"] for r in theirs)
    h_tpot = statistics.median(r["tpot_s"] for r in theirs)
    n = args.new_tokens
    rows = [{"name": "tpustack (jax)", "ttft_s": t_ttft, "tpot_s": t_tpot,
             "tokens_per_s": n / (t_ttft + (n - 1) * t_tpot), "weight_gbs": weight_bytes / t_tpot / 1e9},
            {"name": "transformers (torch)", "ttft_s": h_ttft, "tpot_s": h_tpot,
             "tokens_per_s": n / (h_ttft + (n - 1) * h_tpot), "weight_gbs": weight_bytes / h_tpot / 1e9}]

    ttft_rows = []
    for length in [int(x) for x in args.ttft_lens.split(",") if x]:
        if length + 2 > cfg.max_seq_len:
            continue
        p = rng.integers(0, cfg.vocab_size, length).tolist()
        time_generation(gen, [p], 2)  # warm-up (compiles this prompt bucket)
        hf_generate(hf, p, 2)
        ours_r, theirs_r = [], []
        for i in range(args.repeats):
            ours_r.append(time_generation(gen, [p], 2))
            theirs_r.append(hf_generate(hf, p, 2))
            compare(f"TTFT prompt {length} repeat {i + 1}", ours_r[-1]["tokens"][0], theirs_r[-1]["tokens"])
        ours_t = statistics.median(r["ttft_s"] for r in ours_r)
        theirs_t = statistics.median(r["ttft_s"] for r in theirs_r)
        ttft_rows.append({"prompt_len": length, "tpustack_ttft_s": ours_t, "transformers_ttft_s": theirs_t})
        print(f"TTFT {length}: tpustack {ours_t * 1e3:.0f} ms, transformers {theirs_t * 1e3:.0f} ms",
              file=sys.stderr, flush=True)

    batch_rows = []
    for b in [int(x) for x in args.batches.split(",") if x]:
        prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(b)]
        time_generation(gen, prompts, args.new_tokens)  # warm-up (compiles this batch size)
        runs = [time_generation(gen, prompts, args.new_tokens) for _ in range(args.repeats)]
        r = {k: statistics.median(run[k] for run in runs)
             for k in ("tokens_per_s", "decode_tokens_per_s", "tpot_s", "ttft_s")}
        batch_rows.append({"batch": b, **r})
        print(f"batch {b}: {r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)

    result = {"benchmark": "decode_cpu", "config": os.path.basename(args.config), "params": cfg.num_params(),
              "prompt_len": args.prompt_len, "new_tokens": n, "dtype": "float32", "greedy": True,
              "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": args.threads},
              "gemv_bandwidth_gbs": chip.hbm_bandwidth / 1e9, "matmul_peak_gflops": chip.peak_flops / 1e9,
              "weight_bytes": weight_bytes, "repeats": args.repeats, "statistic": "median after 1 warm-up",
              "identical_tokens": not mismatches, "token_mismatches": mismatches, "rows": rows,
              "roofline": {"cache_len": cache_len, "ceiling_tpot_s": pred.seconds,
                           "predicted_tpot_s": pred.predicted_seconds,
                           "stream_seconds": sum(roofline.op_stream_time(o, chip) for o in pred.ops),
                           "cold_stream_gbs_by_op_bytes": [[s, b / 1e9] for s, b in chip.stream],
                           "op_latency_s": chip.op_latency,
                           "kernels": sum(o.kernels * o.count for o in pred.ops),
                           "bytes": sum(o.bytes * o.count for o in pred.ops),
                           "measured_over_predicted_tpot": t_tpot / pred.predicted_seconds},
              "speedup_vs_transformers": rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"],
              "ttft": ttft_rows, "batches": batch_rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    bw = chip.hbm_bandwidth / 1e9
    print(f"\ndecode, {os.path.basename(args.config)} ({cfg.num_params() / 1e6:.1f}M params, f32), batch 1, "
          f"prompt {args.prompt_len}, {n} new tokens, greedy; {cpu_model()} x {os.cpu_count()} cores")
    print(f"gemv bandwidth (measured): {bw:.1f} GB/s; matmul weights {weight_bytes / 1e6:.0f} MB -> "
          f"roofline {bw * 1e9 / weight_bytes:.1f} tokens/s; identical tokens in every run: {not mismatches}")
    print(f"medians of {args.repeats} runs after a warm-up, both sides timed alike")
    print(f"{'implementation':<22}{'TTFT ms':>9}{'TPOT ms':>9}{'tokens/s':>10}{'weights GB/s':>14}"
          f"{'% gemv':>8}{'vs HF':>7}")
    for r in rows:
        print(f"{r['name']:<22}{r['ttft_s'] * 1e3:>9.1f}{r['tpot_s'] * 1e3:>9.1f}{r['tokens_per_s']:>10.1f}"
              f"{r['weight_gbs']:>14.1f}{100 * r['weight_gbs'] / bw:>7.0f}%"
              f"{r['tokens_per_s'] / rows[1]['tokens_per_s']:>6.2f}x")
    print(f"decode step roofline (cache {cache_len}): ceiling {pred.seconds * 1e3:.1f} ms, predicted "
          f"{pred.predicted_seconds * 1e3:.1f} ms ({1 / pred.predicted_seconds:.1f} tokens/s: "
          f"{sum(o.bytes * o.count for o in pred.ops) / 1e6:.0f} MB streamed cold in "
          f"{sum(roofline.op_stream_time(o, chip) for o in pred.ops) * 1e3:.1f} ms + "
          f"{sum(o.kernels * o.count for o in pred.ops)} ops x {chip.op_latency * 1e6:.2f} us); measured TPOT "
          f"{t_tpot * 1e3:.1f} ms ({1 / t_tpot:.1f} tokens/s) = {t_tpot / pred.predicted_seconds:.2f}x the prediction")
    if ttft_rows:
        print("TTFT by prompt length: " + ", ".join(
            f"{r['prompt_len']}: {r['tpustack_ttft_s'] * 1e3:.0f} ms (HF {r['transformers_ttft_s'] * 1e3:.0f})"
            for r in ttft_rows))
    if batch_rows:
        print("tokens/s by batch: " + ", ".join(f"{r['batch']}: {r['tokens_per_s']:.1f}" for r in batch_rows))
    print(f"wrote {os.path.relpath(args.out, ROOT)}")
    if mismatches:
        print(f"FAILED: tpustack's tokens differ from transformers' in {len(mismatches)} run(s):\n  "
              + "\n  ".join(mismatches), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
