"""The edge-cloud router's threshold sweep on held-out text (chapter 30.6, issue 13 item 7).

    python benchmarks/router.py --big runs/small_12m --small runs/tiny [--prompts 64 --max-tokens 32]

The big model serves behind a real `tpustack serve` app (in-process ASGI through starlette's
TestClient, so no network time is counted); the small one runs in this process. Each
held-out prompt (the built-in corpus's held-out split, cut at line starts) is answered once
both ways: the small model's probe (its first --probe-tokens greedy tokens, scored) and
continuation, and the big model's answer over HTTP; the big model then scores both answers
(mean log-likelihood per token, nats; the quality). Every threshold on the sweep routes each
prompt locally (probe + continuation) or to the cloud (probe + cloud answer) by its
confidence; the three curves are the fraction answered locally, the mean latency and the
mean quality. A second quality measure rides along: the fraction of answer bytes equal to
the held-out text's own continuation. Writes benchmarks/results/router.json and
docs/router_curve.png; prints a table last. Latencies come from a shared 2-core machine: compare them within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from tpustack.machine import cpu_description

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def heldout_prompts(n: int, length: int, answer: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """n (byte prompt of `length`, the text's own next `answer` bytes) from the held-out split,
    each prompt starting after a newline."""
    from tpustack.config import DataConfig
    from tpustack.data import ByteTokenizer, load_tokens

    stream = np.asarray(load_tokens(DataConfig(), ByteTokenizer())["heldout"])
    starts = np.flatnonzero(stream[:-length - answer - 1] == ord("\n")) + 1
    picked = np.random.default_rng(seed).choice(starts, size=n, replace=False)
    return [(stream[s:s + length].tolist(), stream[s + length:s + length + answer].tolist()) for s in sorted(picked)]


def measure(args) -> list[dict]:
    """Per prompt: confidence, local and cloud answers, their latencies and big-model log-likelihoods."""
    from starlette.testclient import TestClient

    from tpustack.data import ByteTokenizer
    from tpustack.infer.engine import Engine, EngineConfig
    from tpustack.infer.router import Cloud, LocalModel, RouteConfig, Router, confidence
    from tpustack.infer.runner import Runner
    from tpustack.infer.server import Server, ServerConfig, create_app
    from tpustack.weights import load_weights

    big, small = load_weights(args.big), load_weights(args.small)
    tok = ByteTokenizer()
    engine = Engine(big.cfg, big.params, EngineConfig(), eos_id=tok.eos_id, detokenize=tok.decode)
    app = create_app(Server(Runner(engine), tok, ServerConfig(model_name="big")))
    scorer, local = LocalModel(*big), LocalModel(*small)
    rows = []
    with TestClient(app) as client:
        router = Router(local, Cloud("http://testserver/v1", "big", client=client),
                        RouteConfig(0.0, args.measure, args.probe_tokens, args.max_tokens))
        prompts = heldout_prompts(args.prompts + 2, args.prompt_bytes, args.max_tokens, args.seed)
        for i, (ids, reference) in enumerate(prompts):
            text = tok.decode(ids)
            start = time.perf_counter()
            _, probe, conf = router.probe(text)
            probe_s = time.perf_counter() - start
            other = "entropy" if args.measure == "max_prob" else "max_prob"  # recorded, not timed
            surest = 1.0 if other == "max_prob" else 0.0
            conf_other = confidence(local.next_logprobs(ids, probe), other) if probe else surest
            start = time.perf_counter()
            rest = args.max_tokens - len(probe)
            more = local.greedy(ids + probe, rest) if rest and len(probe) == args.probe_tokens else []
            local_s = probe_s + time.perf_counter() - start
            start = time.perf_counter()
            cloud_ids = tok.encode(router.cloud.complete(text, args.max_tokens)).tolist()
            cloud_s = time.perf_counter() - start
            if i < 2:
                continue  # warm-up: the first calls compile
            rows.append({"confidence": conf, "confidence_other": conf_other, "probe_s": probe_s,
                         "local_s": local_s, "cloud_s": cloud_s,
                         "ll_local": answer_loglik(scorer, ids, probe + more, tok.eos_id),
                         "ll_cloud": answer_loglik(scorer, ids, cloud_ids, tok.eos_id),
                         "match_local": matched(probe + more, reference), "match_cloud": matched(cloud_ids, reference),
                         "prompt": text, "local": tok.decode(probe + more), "cloud": tok.decode(cloud_ids)})
            print(f"{len(rows):3d}/{args.prompts} conf {conf:.3f} ll local {rows[-1]['ll_local']:.3f} "
                  f"cloud {rows[-1]['ll_cloud']:.3f}", file=sys.stderr)
    return rows


def answer_loglik(scorer, prompt: list[int], answer: list[int], eos_id: int) -> float:
    """The big model's mean log-likelihood per answer token; an empty answer scores its EOS."""
    return float(scorer.loglik(prompt, answer or [eos_id]).mean())


def matched(answer: list[int], reference: list[int]) -> float:
    """Fraction of the reference's bytes the answer has at the same position (a second quality
    measure, from the held-out text itself)."""
    return float(np.mean([i < len(answer) and answer[i] == r for i, r in enumerate(reference)]))


def sweep(rows: list[dict], key: str = "confidence") -> dict:
    """The three curves over every threshold that changes a decision, and the all-cloud/all-local ends."""
    conf = np.array([r[key] for r in rows])
    local_s, routed_cloud_s = np.array([r["local_s"] for r in rows]), np.array([r["probe_s"] + r["cloud_s"]
                                                                                  for r in rows])
    ll_local, ll_cloud = np.array([r["ll_local"] for r in rows]), np.array([r["ll_cloud"] for r in rows])
    match_local, match_cloud = np.array([r["match_local"] for r in rows]), np.array([r["match_cloud"] for r in rows])
    curve = []
    for t in np.concatenate([np.unique(conf), [np.inf]]):
        here = conf >= t
        curve.append({"threshold": float(t), "fraction_local": float(here.mean()),
                      "mean_latency_s": float(np.where(here, local_s, routed_cloud_s).mean()),
                      "quality": float(np.where(here, ll_local, ll_cloud).mean()),
                      "reference_match": float(np.where(here, match_local, match_cloud).mean())})
    all_cloud = {"mean_latency_s": float(np.mean([r["cloud_s"] for r in rows])), "quality": float(ll_cloud.mean()),
                 "reference_match": float(match_cloud.mean())}
    all_local = {"mean_latency_s": float(local_s.mean()), "quality": float(ll_local.mean()),
                 "reference_match": float(match_local.mean())}
    # the goal: at a threshold keeping >= half the prompts local, quality within 5% of all-cloud
    half = [c for c in curve if c["fraction_local"] >= 0.5]
    best = max(half, key=lambda c: c["quality"])
    gap = (all_cloud["quality"] - best["quality"]) / abs(all_cloud["quality"])
    return {"curve": curve, "all_cloud": all_cloud, "all_local": all_local, "at_half_local": best,
            "quality_gap_vs_cloud": float(gap), "goal_met": bool(gap <= 0.05)}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [c for c in result["curve"] if np.isfinite(c["threshold"])]
    t = [c["threshold"] for c in curve]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.6))
    panels = [("fraction_local", "fraction answered locally"), ("mean_latency_s", "mean latency (s)"),
              ("quality", "quality: big model's mean log-lik/token"),
              ("reference_match", "bytes equal to the held-out text")]
    for ax, (key, label) in zip(axes, panels):
        ax.plot(t, [c[key] for c in curve], marker=".", label="router")
        if key != "fraction_local":
            ax.axhline(result["all_cloud"][key], color="tab:red", ls="--", label="all cloud")
            ax.axhline(result["all_local"][key], color="tab:green", ls=":", label="all local")
            ax.legend(fontsize=8)
        ax.axvline(result["at_half_local"]["threshold"], color="gray", lw=0.8)
        ax.set_xlabel(f"threshold ({result['measure']})")
        ax.set_title(label, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", default=os.path.join(ROOT, "runs", "small_12m"))
    parser.add_argument("--small", default=os.path.join(ROOT, "runs", "tiny"))
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-bytes", type=int, default=96)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--probe-tokens", type=int, default=8)
    parser.add_argument("--measure", default="max_prob", choices=["max_prob", "entropy"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "router.json"))
    parser.add_argument("--png", default=os.path.join(ROOT, "docs", "router_curve.png"))
    args = parser.parse_args()

    rows = measure(args)
    result = {"cpu": cpu_description(), "big": args.big, "small": args.small, "measure": args.measure,
              "prompts": len(rows), "prompt_bytes": args.prompt_bytes, "max_tokens": args.max_tokens,
              "probe_tokens": args.probe_tokens, **sweep(rows),
              "other_measure": {k: v for k, v in sweep(rows, "confidence_other").items() if k != "curve"},
              "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    plot(result, args.png)
    print(f"{'threshold':>10} {'local':>6} {'latency s':>10} {'quality':>8} {'ref match':>9}")
    for c in result["curve"][:: max(1, len(result["curve"]) // 12)] + [result["curve"][-1]]:
        print(f"{c['threshold']:10.3f} {c['fraction_local']:6.2f} {c['mean_latency_s']:10.3f} {c['quality']:8.3f} "
              f"{c['reference_match']:9.3f}")
    h, cl, lo = result["at_half_local"], result["all_cloud"], result["all_local"]
    print(f"all cloud: latency {cl['mean_latency_s']:.3f} s, quality {cl['quality']:.3f}, ref match "
          f"{cl['reference_match']:.3f}; all local: {lo['mean_latency_s']:.3f} s, {lo['quality']:.3f}, "
          f"{lo['reference_match']:.3f}")
    print(f"at threshold {h['threshold']:.3f} ({h['fraction_local']:.0%} local): latency {h['mean_latency_s']:.3f} s, "
          f"quality {h['quality']:.3f} (ref match {h['reference_match']:.3f}), "
          f"{result['quality_gap_vs_cloud']:+.1%} vs all-cloud (positive: worse) "
          f"(goal <= 5%: {'met' if result['goal_met'] else 'NOT met'}); {result['cpu']}")


if __name__ == "__main__":
    main()
