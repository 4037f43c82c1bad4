"""Edge vs cloud on this CPU (chapter 30.6): one model through llama.cpp (GGUF f32, q8_0, q4_0)
and through tpustack (f32, int8), side by side, each row beside the roofline's prediction.

    python benchmarks/edge_cpu.py --config configs/bench_125m.py       # speed: the bench shape
    python benchmarks/edge_cpu.py --checkpoint runs/small_12m          # + quality: a trained model

Per row: file size, peak resident memory (each row runs in its own process), TTFT for a
--prompt-len prompt, decode tokens/s at batch 1 (greedy), held-out nats/byte (--heldout
windows of the built-in corpus' held-out split; random weights report it too, but it only
means something for a trained checkpoint), and `tpustack estimate --chip cpu`'s prediction
of tokens/s and TTFT (tpustack.plan.roofline on the measured cold-stream bandwidth and op
latency: the same functions `estimate` prints). Run it on a quiet machine: figures taken
while anything else runs on the cores are void. Needs the `llama` and `gguf` extras.
Dimension letters: T positions, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from tpustack.machine import cpu_description

ROWS = {  # row -> (engine, weight format: a GGUF type or tpustack's model.weight_quant)
    "llama.cpp f32": ("llama.cpp", "f32"),
    "llama.cpp q8_0": ("llama.cpp", "q8_0"),
    "llama.cpp q4_0": ("llama.cpp", "q4_0"),
    "tpustack f32": ("tpustack", "none"),
    "tpustack int8": ("tpustack", "int8"),
}


def weight_bytes_per_param(fmt: str) -> float:
    """Bytes per weight each format streams (GGML's block sizes from the gguf package)."""
    import gguf

    if fmt in ("f32", "q8_0", "q4_0"):
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[fmt.upper()]]
        return size / block
    return {"none": 4.0, "int8": 1.0}[fmt]


def peak_rss_mb() -> float:
    """This process' peak resident set (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    return float("nan")


def nats_per_byte(nll_sum: float, windows_BT: np.ndarray, tokenizer) -> float:
    """Total next-token NLL over the bytes of text the predicted tokens stand for."""
    text_bytes = sum(len(tokenizer.decode([int(t) for t in w[1:]]).encode("utf-8")) for w in windows_BT)
    return nll_sum / max(text_bytes, 1)


def _nll(logits_TV: np.ndarray, ids_T: np.ndarray) -> float:
    """Sum of -log p(ids[t+1] | ids[:t+1])."""
    x = logits_TV[:-1].astype(np.float64)
    logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
    return float(np.sum(logz - x[np.arange(len(x)), ids_T[1:]]))


def run_llama_cpp(path: str, prompt: list[int], new_tokens: int, windows_BT: np.ndarray, repeats: int) -> dict:
    """TTFT, decode tokens/s (a context without per-position logits), and the held-out NLL."""
    from tpustack.interop.gguf_agreement import llama_logits, open_llama

    llm = open_llama(path, n_ctx=max(len(prompt) + new_tokens, windows_BT.shape[1]) + 8)
    nll = sum(_nll(llama_logits(llm, w), w) for w in windows_BT)
    del llm
    import llama_cpp

    llm = llama_cpp.Llama(model_path=path, n_ctx=len(prompt) + new_tokens + 8, n_batch=len(prompt),
                          n_threads=os.cpu_count() or 1, logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def last_argmax() -> int:  # the last position's logits, as llama.cpp left them (no copy)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))

    ttfts, rates, tokens = [], [], []
    for _ in range(repeats + 1):  # the first is a warm-up
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        out = [last_argmax()]
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            llm.eval([out[-1]])
            out.append(last_argmax())
        end = time.perf_counter()
        ttfts.append(first - start)
        rates.append((new_tokens - 1) / (end - first))
        tokens = out
    return {"ttft_s": float(np.median(ttfts[1:])), "tokens_per_s": float(np.median(rates[1:])), "nll": nll,
            "tokens": tokens}


def run_tpustack(checkpoint: str, quant: str, prompt: list[int], new_tokens: int, windows_BT: np.ndarray,
                 repeats: int) -> dict:
    """The same through tpustack's decode loop (greedy, batch 1) and a plain forward for the NLL."""
    import jax

    from tpustack.infer.bench import time_generation
    from tpustack.infer.decode import Generator
    from tpustack.model import Decoder
    from tpustack.model.quant import quantize_params, weight_bytes
    from tpustack.weights import load_weights

    cfg, params, _ = load_weights(checkpoint)
    if quant != "none":
        params, cfg = quantize_params(params, quant), dataclasses.replace(cfg, weight_quant=quant)
    forward = jax.jit(lambda p, x: Decoder(cfg).apply({"params": p}, x))
    nll = sum(_nll(np.asarray(forward(params, w[None])[0], np.float32), w) for w in windows_BT)
    gen = Generator(cfg, params, cache_dtype="float32", eos_id=-1)
    runs = [time_generation(gen, [prompt], new_tokens) for _ in range(repeats + 1)]
    return {"ttft_s": float(np.median([r["ttft_s"] for r in runs[1:]])),
            "tokens_per_s": float(np.median([r["decode_tokens_per_s"] for r in runs[1:]])), "nll": nll,
            "tokens": runs[-1]["tokens"][0], "file_bytes": weight_bytes(params)}


def predictions(cfg, chip, fmt: str, engine: str, prompt_len: int, new_tokens: int) -> dict:
    """The roofline's decode tokens/s and TTFT for one row (what `tpustack estimate` computes)."""
    from tpustack.plan.roofline import decode_ops, predict, train_ops

    kv = "float32" if engine == "tpustack" else "float16"  # llama.cpp's KV cache is f16
    w_bytes = weight_bytes_per_param(fmt)
    context = prompt_len + new_tokens // 2  # the mean cache length over the decode
    ops = [dataclasses.replace(op, bytes=op.bytes * (w_bytes / 4.0) if op.kind == "matmul" else op.bytes)
           for op in decode_ops(cfg, 1, context, "float32", kv, "float32", kv_copies=int(engine == "tpustack"))]
    # (matmul bytes are ~all weight bytes at batch 1: scaled from f32 to the format's bytes)
    decode = predict(ops, chip, 1)
    # prefill: one forward over the prompt = train_ops' forward third
    fwd = [dataclasses.replace(op, flops=op.flops / 3, bytes=op.bytes / 3)
           for op in train_ops(cfg, 1, prompt_len, "float32") if op.name != "cross-entropy"]
    prefill = predict(fwd, chip, prompt_len)
    return {"predicted_tokens_per_s": decode.predicted_tokens_per_s,
            "predicted_ttft_s": prefill.predicted_seconds + decode.predicted_seconds}


def child(args) -> None:
    """One row in this process (so its peak memory is its own); prints a JSON line."""
    spec = json.loads(args.row_spec)
    windows_BT = np.asarray(spec["windows"], np.int32)
    if spec["engine"] == "llama.cpp":
        result = run_llama_cpp(spec["file"], spec["prompt"], spec["new_tokens"], windows_BT, spec["repeats"])
    else:
        result = run_tpustack(spec["checkpoint"], spec["fmt"], spec["prompt"], spec["new_tokens"], windows_BT,
                              spec["repeats"])
    result["rss_mb"] = peak_rss_mb()
    print("ROW " + json.dumps(result))


def prepare(args, tmp: str):
    """(checkpoint dir, weights, GGUF files by type, held-out windows, prompt)."""
    from tpustack.config import DataConfig, load_config
    from tpustack.data import ByteTokenizer, load_tokens
    from tpustack.export import EXPORTERS
    from tpustack.weights import init_weights, load_weights

    if args.checkpoint:
        checkpoint, weights = args.checkpoint, load_weights(args.checkpoint)
    else:  # random weights of the config, written once so every row reads the same ones
        weights = init_weights(load_config(args.config).model, seed=0)
        weights = weights._replace(tokenizer=ByteTokenizer())
        checkpoint = os.path.join(tmp, "hf")
        EXPORTERS["hf"](weights, checkpoint, None)
    files = {}
    for fmt in ("f32", "q8_0", "q4_0"):
        files[fmt] = os.path.join(tmp, f"model-{fmt}.gguf")
        EXPORTERS["gguf"](weights, files[fmt], fmt)
    tokenizer = weights.tokenizer or ByteTokenizer()
    stream = np.asarray(load_tokens(DataConfig(), tokenizer)["heldout"])
    t = args.window
    windows_BT = stream[: args.heldout * t].reshape(args.heldout, t) % weights.cfg.vocab_size
    prompt = [int(x) for x in stream[-args.prompt_len:]]
    return checkpoint, weights, files, windows_BT, prompt, tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a trained workdir / HF dir / .gguf (default: "
                        "random weights of --config)")
    parser.add_argument("--config", default="configs/bench_125m.py")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--heldout", type=int, default=8, help="held-out windows for nats/byte")
    parser.add_argument("--window", type=int, default=256, help="tokens per held-out window")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of the rows")
    parser.add_argument("--out", default=None, help="JSON (default benchmarks/results/edge_cpu_<model>.json)")
    parser.add_argument("--row-spec", default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.row_spec:
        return child(args)

    from tpustack.plan.chips import measure_cpu_streams

    chip = measure_cpu_streams()  # before any row: the machine's limits, measured in this run
    tmp = tempfile.mkdtemp(prefix="edge_cpu_")
    checkpoint, weights, files, windows_BT, prompt, tokenizer = prepare(args, tmp)
    rows = []
    for name in args.rows.split(","):
        engine, fmt = ROWS[name]
        spec = {"engine": engine, "fmt": fmt, "file": files.get(fmt), "checkpoint": checkpoint,
                "prompt": prompt, "new_tokens": args.new_tokens, "windows": windows_BT.tolist(),
                "repeats": args.repeats}
        proc = subprocess.run([sys.executable, __file__, "--row-spec", json.dumps(spec)], capture_output=True,
                              text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
        if proc.returncode or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        r = json.loads(lines[-1][4:])
        size = os.path.getsize(files[fmt]) if engine == "llama.cpp" else r["file_bytes"]
        rows.append({"row": name, "file_mb": size / 2**20, "rss_mb": r["rss_mb"], "ttft_ms": 1e3 * r["ttft_s"],
                     "tokens_per_s": r["tokens_per_s"], "nats_per_byte": nats_per_byte(r["nll"], windows_BT,
                                                                                       tokenizer),
                     "tokens": r["tokens"],
                     **predictions(weights.cfg, chip, fmt, engine, len(prompt), args.new_tokens)})
        print(f"  {name}: {r['tokens_per_s']:.1f} tok/s", file=sys.stderr)
    report(args, weights.cfg, chip, rows)


def report(args, cfg, chip, rows: list[dict]) -> None:
    """Print the table last and write the JSON."""
    f32 = next((r for r in rows if r["row"] == "tpustack f32"), rows[0])
    for r in rows:
        r["vs_tpustack_f32"] = r["tokens_per_s"] / f32["tokens_per_s"]
        r["measured_over_predicted"] = r["tokens_per_s"] / r["predicted_tokens_per_s"]
        r["greedy_equal_to_tpustack_f32"] = r["tokens"] == f32["tokens"]
    model = os.path.basename(os.path.normpath(args.checkpoint or args.config)).removesuffix(".py")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"edge_cpu_{model}.json")
    result = {"machine": cpu_description(), "model": model, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "matmul_peak_gflops": chip.peak_flops / 1e9, "stream_gb_s": chip.hbm_bandwidth / 1e9, "rows": rows}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nedge vs cloud: {model} on {result['machine']}; f32 matmul peak {chip.peak_flops / 1e9:.0f} GFLOP/s, "
          f"stream {chip.hbm_bandwidth / 1e9:.1f} GB/s; prompt {args.prompt_len}, {args.new_tokens} new tokens")
    head = (f"{'row':16} {'file MB':>8} {'RSS MB':>8} {'TTFT ms':>8} {'pred':>7} {'tok/s':>7} {'pred':>7} "
            f"{'meas/pred':>9} {'vs f32':>7} {'nats/B':>7}")
    print(head)
    for r in rows:
        print(f"{r['row']:16} {r['file_mb']:8.1f} {r['rss_mb']:8.0f} {r['ttft_ms']:8.1f} "
              f"{1e3 * r['predicted_ttft_s']:7.1f} {r['tokens_per_s']:7.1f} {r['predicted_tokens_per_s']:7.1f} "
              f"{r['measured_over_predicted']:9.2f} {r['vs_tpustack_f32']:7.2f} {r['nats_per_byte']:7.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
