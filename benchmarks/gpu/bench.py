"""GPU check-and-time run for tpustack.kernels (see run.sh; issue 5 item 8).

1. Limits of the card, measured here: copy bandwidth (GB/s) and bf16 matmul (TFLOP/s).
2. Every GPU kernel against its reference on the GPU (max abs error, pass/fail).
3. Medians after warm-up: flash attention fwd and fwd+bwd vs jax.nn.dot_product_attention
   (cudnn, xla) and jax's bundled Pallas GPU attention at S = 1k..16k, H = 128, bf16,
   causal; peak temp bytes at S = 16k; decode attention vs XLA; int8 / int4 matmul vs
   a bf16 jnp.dot at decode shapes. A ratio table is printed last; JSON goes to --out.

The JSON is rewritten after every measurement, so a timeout or a crash keeps what was
measured ("status" says how far it got). Exit status: 0 when every check ran and passed and
none of tpustack's own measurements raised; 1 when a check failed, raised or never ran, or
one of ours raised (a peer's error, e.g. cuDNN refusing a shape, is recorded, not fatal);
2 when there is no GPU and no --dry-run. The reasons print after the table.

--dry-run runs the same code on CPU at tiny shapes with the kernels interpreted: it
proves the script parses, imports and produces its table, not any figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as pyplatform
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from tpustack.kernels import (decode_attention, flash_attention, int4_matmul, int8_matmul, paged_attention,
                              reference as R)

DEADLINE = [float("inf")]
RESULTS: dict = {"status": "starting", "checks": [], "timings": [], "limits": {}, "memory": [], "errors": []}
JSON_PATH = [None]  # where save() writes; set by main
CHECKS = ("flash", "decode", "decode_int8", "paged", "matmul")  # every one must run and pass
PEERS = ("cudnn", "xla", "jax_pallas", "bf16 dot")  # their failures are recorded, not fatal


def save() -> None:
    """Rewrite the JSON with everything measured so far (atomically: a kill leaves a whole file)."""
    if JSON_PATH[0] is None:
        return
    tmp = JSON_PATH[0] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    os.replace(tmp, JSON_PATH[0])


def record(section: str, entry: dict) -> None:
    RESULTS[section].append(entry)
    save()


def median_time(fn, *args, reps: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn(*args) after warm-up (fn already jitted)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def guarded(label: str, fn, fatal: bool = True):
    """Run fn, record an error (fatal: it fails the run) instead of dying; skip once past the time budget."""
    if time.time() > DEADLINE[0]:
        record("errors", {"what": label, "error": "skipped: time budget", "fatal": False})
        return None
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark records failures and goes on
        record("errors", {"what": label, "error": f"{type(e).__name__}: {str(e)[:300]}", "fatal": fatal})
        traceback.print_exc(limit=2)
        return None


def limits(small: bool) -> None:
    n = (1 << 16) if small else (1 << 28)  # 512 MiB of bf16
    x = jnp.ones((n,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 1 + 1)
    t = median_time(copy, x)
    RESULTS["limits"]["copy_GBps"] = 2 * x.nbytes / t / 1e9
    save()
    m = 256 if small else 8192
    a = jnp.ones((m, m), jnp.bfloat16)
    dot = jax.jit(lambda a: a @ a)
    t = median_time(dot, a)
    RESULTS["limits"]["bf16_matmul_TFLOPs"] = 2 * m ** 3 / t / 1e12
    save()


def _err(a, b) -> float:
    return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))


def checks(small: bool, interpret: bool) -> None:
    """Each GPU kernel against its reference, on this device."""
    r = np.random.default_rng(0)
    kw = dict(impl="pallas", platform="gpu", interpret=interpret)
    T = 128 if small else 1024
    B, N, K, H = 1, 4, 2, (32 if small else 128)
    mk = lambda *s, dt=jnp.bfloat16: jnp.asarray(r.normal(size=s), dt)
    q, k, v = mk(B, T, N, H), mk(B, T, K, H), mk(B, T, K, H)
    seg = jnp.asarray(np.sort(r.integers(0, 3, (B, T)), 1))

    def flash():
        f = lambda q, k, v: flash_attention(q, k, v, seg, causal=True, soft_cap=30.0, **kw)
        g = lambda q, k, v: R.attention_reference(q, k, v, seg, seg, causal=True, soft_cap=30.0)
        o, vjp = jax.vjp(f, q, k, v)
        ro, rvjp = jax.vjp(g, q, k, v)
        do = mk(*o.shape)
        errs = [_err(o, ro)] + [_err(a, b) for a, b in zip(vjp(do), rvjp(do))]
        return {"kernel": "flash_attention fwd+bwd bf16", "max_err": max(errs), "ok": max(errs) < 0.1}

    S = 256 if small else 4096
    qd, kc, vc = mk(4, N, H), mk(4, S, K, H), mk(4, S, K, H)
    lens = jnp.array([1, S // 3, S // 2 + 7, S])

    def decode():
        e = _err(decode_attention(qd, kc, vc, lens, **kw), R.decode_attention_reference(qd, kc, vc, lens))
        return {"kernel": "decode_attention bf16", "max_err": e, "ok": e < 0.05}

    def decode8():
        s = jnp.asarray(r.uniform(0.01, 0.02, (4, S, K)), jnp.float32)
        k8 = jnp.asarray(r.integers(-127, 128, (4, S, K, H)), jnp.int8)
        e = _err(decode_attention(qd, k8, k8, lens, k_scale_BSK=s, v_scale_BSK=s, **kw),
                 R.decode_attention_reference(qd, k8, k8, lens, k_scale_BSK=s, v_scale_BSK=s))
        return {"kernel": "decode_attention int8 kv", "max_err": e, "ok": e < 0.05}

    def paged():
        P, L = 64, 16
        kp, vp = mk(P, L, K, H), mk(P, L, K, H)
        table = jnp.asarray(r.permutation(P)[:16].reshape(4, 4), jnp.int32)
        pl_lens = jnp.array([1, 17, 40, 64])
        e = _err(paged_attention(qd, kp, vp, table, pl_lens, **kw),
                 R.paged_attention_reference(qd, kp, vp, table, pl_lens))
        return {"kernel": "paged_attention bf16", "max_err": e, "ok": e < 0.05}

    def mm():
        Kd = 512 if small else 4096
        x, w = mk(4, Kd), jnp.asarray(r.normal(size=(Kd, 256)) * 0.05, jnp.float32)
        q8, s8 = R.quantize_int8(w)
        p4, s4 = R.quantize_int4(w)
        e8 = _err(int8_matmul(x, q8, s8, **kw), R.int8_matmul_reference(x, q8, s8))
        e4 = _err(int4_matmul(x, p4, s4, **kw), R.int4_matmul_reference(x, p4, s4))
        return {"kernel": "int8/int4 matmul bf16", "max_err": max(e8, e4), "ok": max(e8, e4) < 0.1}

    fns = {"flash": flash, "decode": decode, "decode_int8": decode8, "paged": paged, "matmul": mm}
    assert tuple(fns) == CHECKS
    for name, fn in fns.items():
        res = guarded(f"check {name}", fn)
        if res is None:  # it raised (or the budget ran out): a check that did not pass
            why = RESULTS["errors"][-1]["error"]
            record("checks", {"check": name, "kernel": name, "max_err": None, "ok": False, "error": why})
            print(f"check {name:32s} FAIL: {why}", flush=True)
            continue
        record("checks", {"check": name, **res})
        print(f"check {res['kernel']:32s} max_err={res['max_err']:.3e} {'ok' if res['ok'] else 'FAIL'}", flush=True)


def _attention_impls(interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as bundled
    ours = lambda q, k, v: flash_attention(q, k, v, causal=True, impl="pallas", platform="gpu", interpret=interpret)
    impls = {"tpustack": ours,
             "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"),
             "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
             "jax_pallas": lambda q, k, v: bundled.mha(q, k, v, None, sm_scale=q.shape[-1] ** -0.5, causal=True,
                                                       interpret=interpret)}
    return impls


def time_attention(small: bool, interpret: bool) -> None:
    seqs = [128, 256] if small else [1024, 2048, 4096, 8192, 16384]
    N, H = (2, 32) if small else (16, 128)
    for S in seqs:
        B = max(1, (512 if small else 16384) // S)
        q = jnp.asarray(np.random.default_rng(S).normal(size=(B, S, N, H)), jnp.bfloat16)
        flops = 4 * B * N * S * S * H / 2  # causal forward
        for name, f in _attention_impls(interpret).items():
            fwd = jax.jit(f)
            grad = jax.jit(jax.grad(lambda q, k, v: f(q, k, v).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
            for mode, fn, fl in (("fwd", fwd, flops), ("fwd+bwd", grad, 3.5 * flops)):
                t = guarded(f"attention {name} {mode} S={S}", lambda: median_time(fn, q, q, q, reps=3 if small else 10),
                            fatal=name not in PEERS)
                if t is not None:
                    record("timings", {"op": f"attention {mode}", "S": S, "B": B, "impl": name,
                                       "ms": t * 1e3, "TFLOPs": fl / t / 1e12})
                    print(f"attention {mode:8s} S={S:6d} {name:10s} {t * 1e3:9.3f} ms {fl / t / 1e12:7.1f} TFLOP/s", flush=True)
            if S == seqs[-1]:  # O(S) memory: compiled temp bytes for the longest sequence
                def mem(grad=grad):
                    c = grad.lower(q, q, q).compile()
                    return int(c.memory_analysis().temp_size_in_bytes)
                b = guarded(f"memory {name} S={S}", mem, fatal=name not in PEERS)
                record("memory", {"impl": name, "S": S, "temp_bytes": b})


def time_decode(small: bool, interpret: bool) -> None:
    B, S, N, K, H = (4, 256, 4, 2, 32) if small else (16, 8192, 32, 8, 128)
    r = np.random.default_rng(0)
    q = jnp.asarray(r.normal(size=(B, N, H)), jnp.bfloat16)
    k = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.bfloat16)
    lens = jnp.full((B,), S, jnp.int32)
    nbytes = 2 * k.nbytes
    for name, impl in (("tpustack", "pallas"), ("xla", "xla")):
        fn = jax.jit(lambda q, k, v, n, impl=impl: decode_attention(q, k, v, n, impl=impl, platform="gpu", interpret=interpret))
        t = guarded(f"decode {name}", lambda: median_time(fn, q, k, k, lens, reps=3 if small else 20),
                    fatal=name not in PEERS)
        if t is not None:
            record("timings", {"op": "decode attention", "S": S, "B": B, "impl": name, "ms": t * 1e3, "GBps": nbytes / t / 1e9})
            print(f"decode   B={B} S={S} {name:10s} {t * 1e3:9.3f} ms {nbytes / t / 1e9:8.1f} GB/s", flush=True)


def time_matmul(small: bool, interpret: bool) -> None:
    dims = [512] if small else [4096, 8192]
    r = np.random.default_rng(0)
    for D in dims:
        w = jnp.asarray(r.normal(size=(D, D)) * 0.02, jnp.float32)
        wb = w.astype(jnp.bfloat16)
        q8, s8 = R.quantize_int8(w)
        p4, s4 = R.quantize_int4(w)
        for M in ([1, 16] if small else [1, 4, 16]):
            x = jnp.asarray(r.normal(size=(M, D)), jnp.bfloat16)
            runs = {"bf16 dot": (jax.jit(lambda x, w: x @ w), (x, wb), wb.nbytes),
                    "int8": (jax.jit(lambda x, w, s: int8_matmul(x, w, s, impl="pallas", platform="gpu", interpret=interpret)), (x, q8, s8), q8.nbytes),
                    "int4": (jax.jit(lambda x, w, s: int4_matmul(x, w, s, impl="pallas", platform="gpu", interpret=interpret)), (x, p4, s4), p4.nbytes)}
            for name, (fn, args, nb) in runs.items():
                t = guarded(f"matmul {name} M={M} D={D}", lambda: median_time(fn, *args, reps=3 if small else 20),
                            fatal=name not in PEERS)
                if t is not None:
                    record("timings", {"op": "matmul", "M": M, "D": D, "impl": name, "ms": t * 1e3, "GBps": nb / t / 1e9})
                    print(f"matmul   M={M:2d} K=N={D} {name:8s} {t * 1e3:9.3f} ms {nb / t / 1e9:8.1f} GB/s(weights)", flush=True)


def ratio_table() -> str:
    """Rows: our time against each peer's (peer_ms / our_ms: above 1 means we are faster)."""
    by = {}
    for t in RESULTS["timings"]:
        key = (t["op"], t.get("S"), t.get("M"), t.get("D"))
        by.setdefault(key, {})[t["impl"]] = t
    lim = RESULTS["limits"]
    lines = [f"card: {RESULTS['device']}   copy {lim.get('copy_GBps', 0):.0f} GB/s   "
             f"bf16 matmul {lim.get('bf16_matmul_TFLOPs', 0):.1f} TFLOP/s",
             f"{'op':18s} {'shape':16s} {'ours ms':>9s} {'ours rate':>12s}  ratios (peer_ms / ours_ms)"]
    for (op, S, M, D), row in sorted(by.items(), key=lambda kv: str(kv[0])):
        ours = row.get("tpustack") or row.get("int8")
        if op == "matmul":
            base = row.get("bf16 dot")
            for q in ("int8", "int4"):
                if q in row and base:
                    lines.append(f"{op + ' ' + q:18s} {f'M={M} K=N={D}':16s} {row[q]['ms']:9.3f} "
                                 f"{row[q]['GBps']:8.0f} GB/s  vs bf16 dot {base['ms'] / row[q]['ms']:.2f}x")
            continue
        if not ours:
            continue
        rate = f"{ours['TFLOPs']:6.1f} TF/s" if "TFLOPs" in ours else f"{ours['GBps']:7.0f} GB/s"
        peers = "  ".join(f"{p} {row[p]['ms'] / ours['ms']:.2f}x" for p in row if p != "tpustack")
        lines.append(f"{op:18s} {f'S={S}':16s} {ours['ms']:9.3f} {rate:>12s}  {peers}")
    for m in RESULTS["memory"]:
        b = m["temp_bytes"]
        lines.append(f"peak temp bytes fwd+bwd S={m['S']} {m['impl']:10s} {'n/a' if b is None else f'{b / 2**20:.0f} MiB'}")
    ok = [c for c in RESULTS["checks"] if c["ok"]]
    fatal = sum(1 for e in RESULTS["errors"] if e.get("fatal"))
    lines.append(f"checks: {len(ok)}/{len(CHECKS)} ok; errors: {len(RESULTS['errors'])} ({fatal} fatal)")
    return "\n".join(lines)


def failures() -> list[str]:
    """Why this run fails (empty: it passes): checks that failed, raised or never ran, and our own errors."""
    ran = {c["check"]: c for c in RESULTS["checks"]}
    out = [f"check {n} never ran" for n in CHECKS if n not in ran]
    out += [f"check {n} failed: " + (c.get("error") or f"max_err {c['max_err']:.3e}")
            for n, c in ran.items() if not c["ok"]]
    out += [f"{e['what']}: {e['error']}" for e in RESULTS["errors"]
            if e.get("fatal") and not e["what"].startswith("check ")]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--dry-run", action="store_true", help="CPU: tiny shapes, kernels interpreted")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop timing after this many seconds")
    a = ap.parse_args(argv)
    DEADLINE[0] = time.time() + a.budget_s
    dev = jax.devices()[0]
    if not a.dry_run and dev.platform != "gpu":
        print(f"no GPU here ({dev.platform}); use --dry-run", file=sys.stderr)
        return 2
    small = interpret = a.dry_run
    RESULTS.update(device=f"{dev.device_kind} ({dev.platform})", jax=jax.__version__, python=pyplatform.python_version(),
                   host=pyplatform.node(), dry_run=a.dry_run)
    os.makedirs(a.out, exist_ok=True)
    name = "gpu_kernels_dry_run.json" if a.dry_run else f"gpu_kernels_{dev.device_kind.replace(' ', '_')}.json"
    JSON_PATH[0] = os.path.join(a.out, name)
    t0 = time.time()
    for part_name, part in (("limits", lambda: limits(small)), ("checks", lambda: checks(small, interpret)),
                            ("attention", lambda: time_attention(small, interpret)),
                            ("decode", lambda: time_decode(small, interpret)),
                            ("matmul", lambda: time_matmul(small, interpret))):
        RESULTS["status"] = f"running {part_name}"
        save()
        guarded(f"part {part_name}", part)
    RESULTS["wall_s"] = time.time() - t0
    why = failures()
    RESULTS.update(status="done", failures=why, exit_code=1 if why else 0)
    save()
    print(ratio_table())
    print(f"wrote {JSON_PATH[0]}")
    if why:
        print("FAILED:\n  " + "\n  ".join(why), flush=True)
    return 1 if why else 0


if __name__ == "__main__":
    sys.exit(main())
