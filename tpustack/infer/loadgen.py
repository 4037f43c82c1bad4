"""Serving load and its figures, as vLLM's benchmark_serving defines them (issue 11, item 4).

A workload is a seeded list of requests: prompt and output lengths from a lognormal (a
ShareGPT-like spread, clamped to the model's context), random prompt tokens, and send
times: Poisson arrivals at a rate, all at once, or a fixed number of clients that each send
the next request when their last one ends (`Clients`). The drivers in
tpustack.infer.load_drivers run it against the engine, a server, the static decode loop or
transformers and hand back one `Record` per request; `summarize` turns them into:

- TTFT: first token's arrival - send time; E2E: last token's - send time;
- TPOT = (E2E - TTFT) / (n_out - 1), over requests with n_out > 1;
- ITL: gaps between consecutive token (HTTP: chunk) arrivals, over all requests;
- each at mean, p50, p99; request throughput and output tokens/s over the run's span
  (first send to last token); goodput: requests/s that met every SLO given.
"""

from __future__ import annotations

import dataclasses
import heapq
import math

import numpy as np

from tpustack.errors import UserError


@dataclasses.dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]
    arrivals: list[float]  # seconds after the start at which each request wants to go out
    shared_prefix: int = 0  # leading tokens every prompt shares

    def __len__(self) -> int:
        return len(self.prompts)

    def with_new_tokens(self, seed: int, vocab: int) -> "Workload":
        """The same lengths, arrivals and sharing, other tokens: a warm-up that compiles what the
        timed pass will, without filling the prefix cache with the timed pass's prompts."""
        rng = np.random.default_rng(seed)
        prefix = rng.integers(0, vocab, self.shared_prefix).tolist()
        prompts = [prefix + rng.integers(0, vocab, len(p) - self.shared_prefix).tolist() for p in self.prompts]
        return dataclasses.replace(self, prompts=prompts)


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    """n integer lengths with the given mean (before clamping to [lo, hi]); sigma 0: all `mean`."""
    mu = math.log(mean) - sigma ** 2 / 2  # E[exp(N(mu, s^2))] = exp(mu + s^2 / 2)
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(int)


def make_workload(n: int, vocab: int, context: int, seed: int = 0, prompt_mean: float = 256,
                  output_mean: float = 128, sigma: float = 1.0, output_range: tuple[int, int] = (16, 256),
                  rate: float = math.inf, shared_prefix: int = 0) -> Workload:
    """n seeded requests; prompt + output always fit `context` (prompts are cut to make room)."""
    lo, hi = output_range
    if n < 1 or prompt_mean < 1 or output_mean < 1 or not 1 <= lo <= hi or sigma < 0 or rate <= 0:
        raise UserError(f"workload: need n >= 1, means >= 1, 1 <= min output <= max output, sigma >= 0, rate > 0 "
                        f"(got n={n}, means {prompt_mean}/{output_mean}, outputs {lo}..{hi}, sigma {sigma}, "
                        f"rate {rate})")
    if shared_prefix + 1 + lo > context:
        raise UserError(f"--shared-prefix {shared_prefix}: with {lo} output tokens it leaves no room in the "
                        f"model's {context}-token context")
    rng = np.random.default_rng(seed)
    outs = lognormal_lengths(rng, n, output_mean, sigma, lo, min(hi, context - shared_prefix - 1))
    lens = lognormal_lengths(rng, n, prompt_mean, sigma, 1, context - 1)
    prefix = rng.integers(0, vocab, shared_prefix).tolist()
    prompts = []
    for length, out in zip(lens, outs):
        own = max(min(int(length), context - out - shared_prefix), 1)
        prompts.append(prefix + rng.integers(0, vocab, own).tolist())
    gaps = rng.exponential(1.0 / rate, n) if math.isfinite(rate) else np.zeros(n)
    gaps[0] = 0.0
    return Workload(prompts, [int(o) for o in outs], np.cumsum(gaps).tolist(), shared_prefix)


class Clients:
    """Who sends what when: request i goes at max(its arrival, the time a client is free).
    concurrency None: unbounded (open loop); else that many clients, each waiting for its
    last request to end before sending (vLLM's --max-concurrency)."""

    def __init__(self, workload: Workload, concurrency: int | None = None):
        self.workload, self.next = workload, 0
        n = concurrency or len(workload)
        self.free = [0.0] * min(n, len(workload))  # a heap of the times clients become free

    def left(self) -> int:
        return len(self.workload) - self.next

    def send_time(self) -> float | None:
        """When the next request goes out, or None (all sent, or every client still waiting)."""
        if not self.left() or not self.free:
            return None
        return max(self.workload.arrivals[self.next], self.free[0])

    def send(self) -> tuple[int, float]:
        """(index, send time) of the next request; its client is busy until `done`."""
        t = self.send_time()
        heapq.heappop(self.free)
        self.next += 1
        return self.next - 1, t

    def done(self, t: float) -> None:
        heapq.heappush(self.free, t)


@dataclasses.dataclass
class Record:
    """One request as the client saw it (times in seconds on one clock)."""

    index: int  # the workload's request
    prompt_len: int
    sent: float
    times: list[float] = dataclasses.field(default_factory=list)  # each token's (HTTP: chunk's) arrival
    n_out: int = 0
    tokens: list[int] | None = None  # the output ids, where the driver sees them
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.n_out - 1) if self.n_out > 1 else None


def _stats(values: list[float]) -> dict:
    """mean, p50, p99 in milliseconds (None where there are no values)."""
    if not values:
        return {"mean_ms": None, "p50_ms": None, "p99_ms": None}
    v = np.asarray(values) * 1e3
    return {"mean_ms": float(v.mean()), "p50_ms": float(np.percentile(v, 50)), "p99_ms": float(np.percentile(v, 99))}


def summarize(records: list[Record], slo_ttft_ms: float | None = None, slo_tpot_ms: float | None = None) -> dict:
    """vLLM's serving figures over the requests that completed."""
    ok = [r for r in records if r.error is None and r.times]
    if not ok:
        return {"completed": 0, "errors": len(records)}
    span = max(r.times[-1] for r in ok) - min(r.sent for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    itls = [b - a for r in ok for a, b in zip(r.times, r.times[1:])]

    def good(r: Record) -> bool:
        return ((slo_ttft_ms is None or r.ttft * 1e3 <= slo_ttft_ms)
                and (slo_tpot_ms is None or r.tpot is None or r.tpot * 1e3 <= slo_tpot_ms))

    out_tokens = sum(r.n_out for r in ok)
    prompt_tokens = sum(r.prompt_len for r in ok)
    return {"completed": len(ok), "errors": len(records) - len(ok), "duration_s": span,
            "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
            "request_throughput": len(ok) / span, "output_throughput": out_tokens / span,
            "total_token_throughput": (prompt_tokens + out_tokens) / span,
            "goodput": sum(map(good, ok)) / span if slo_ttft_ms or slo_tpot_ms else None,
            "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
            "ttft": _stats([r.ttft for r in ok]), "tpot": _stats(tpots), "itl": _stats(itls),
            "e2e": _stats([r.e2e for r in ok])}


def agreement(a: list[Record], b: list[Record]) -> dict:
    """How far two runs' outputs for the same requests agree: the share of requests whose
    first token and whole output are equal, and the mean share of the common prefix."""
    pairs = [(x.tokens, y.tokens) for x, y in zip(a, b) if x.tokens is not None and y.tokens is not None]
    if not pairs:
        return {"requests": 0}
    prefix = []
    for x, y in pairs:
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        prefix.append(n / max(len(x), len(y), 1))
    return {"requests": len(pairs), "first_token_equal": float(np.mean([x[:1] == y[:1] for x, y in pairs])),
            "all_equal": float(np.mean([x == y for x, y in pairs])), "mean_common_prefix": float(np.mean(prefix))}


def render(results: dict[str, dict]) -> str:
    """One table, a column per mode: throughputs, then TTFT / TPOT / ITL / E2E in ms."""
    modes = list(results)
    rows = [("completed", "completed", "{:.0f}"), ("errors", "errors", "{:.0f}"),
            ("duration s", "duration_s", "{:.2f}"), ("requests/s", "request_throughput", "{:.3f}"),
            ("output tok/s", "output_throughput", "{:.1f}"), ("total tok/s", "total_token_throughput", "{:.1f}"),
            ("goodput req/s", "goodput", "{:.3f}")]
    lines = [f"{'':<16}" + "".join(f"{m:>14}" for m in modes)]

    def cell(value, fmt: str) -> str:
        return f"{'-' if value is None else fmt.format(value):>14}"

    for label, key, fmt in rows:
        lines.append(f"{label:<16}" + "".join(cell(results[m].get(key), fmt) for m in modes))
    for metric in ("ttft", "tpot", "itl", "e2e"):
        for stat in ("mean_ms", "p50_ms", "p99_ms"):
            label = f"{metric.upper()} {stat[:-3]} ms"
            lines.append(f"{label:<16}" + "".join(cell(results[m].get(metric, {}).get(stat), "{:.2f}")
                                                   for m in modes))
    return "\n".join(lines)
