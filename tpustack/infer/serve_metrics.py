"""Prometheus metrics of `tpustack serve`: TTFT, TPOT, inter-token and end-to-end latency
histograms from each finished request's engine times, and the engine's state (running and
waiting requests, pages in use, preemptions, prefix-cache hit rate) read at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from tpustack.infer.engine import Request
from tpustack.infer.runner import Runner

LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Prometheus metrics: latency histograms from finished requests, engine state at scrape."""

    def __init__(self, runner: Runner):
        self.registry = r = CollectorRegistry()
        hist = lambda name, doc: Histogram(name, doc, registry=r, buckets=LATENCY_BUCKETS)  # noqa: E731
        self.ttft = hist("tpustack_time_to_first_token_seconds", "arrival to first output token")
        self.tpot = hist("tpustack_time_per_output_token_seconds", "(last token - first token) / (n_out - 1)")
        self.itl = hist("tpustack_inter_token_latency_seconds", "time between consecutive output tokens")
        self.e2e = hist("tpustack_e2e_request_latency_seconds", "arrival to finish")
        self.requests = Counter("tpustack_requests", "finished engine requests (one per choice)",
                                ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("tpustack_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("tpustack_generation_tokens", "output tokens of finished requests",
                                         registry=r)
        r.register(_EngineCollector(runner))
        runner.on_finish = self.finished

    def finished(self, req: Request) -> None:
        """Called on the engine thread; never raises (it would stop the engine)."""
        try:
            self.requests.labels(req.finish_reason or "unknown").inc()
            self.prompt_tokens.inc(len(req.prompt))
            self.generation_tokens.inc(len(req.output))
            times = req.token_times
            if times:
                self.ttft.observe(times[0] - req.arrival)
                for a, b in zip(times, times[1:]):
                    self.itl.observe(b - a)
                if len(times) > 1:
                    self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))
            if req.finish_time is not None:
                self.e2e.observe(req.finish_time - req.arrival)
        except Exception:  # noqa: BLE001 - metrics must not take the engine down
            pass


class _EngineCollector:
    """The engine's state and counters, read when scraped."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def collect(self):
        engine = self.runner.engine
        pool = engine.pool
        gauges = {"tpustack_requests_running": ("requests in the engine's running batch", len(engine.running)),
                  "tpustack_requests_waiting": ("requests queued for admission", len(engine.waiting)),
                  "tpustack_kv_pages_in_use": ("KV cache pages held by requests", pool.in_use()),
                  "tpustack_kv_pages_total": ("KV cache pages in the pool", pool.capacity),
                  "tpustack_prefix_cache_hit_rate": ("prefix-cache hits / full prompt pages looked up",
                                                     pool.stats.hit_rate)}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {"tpustack_preemptions": ("requests preempted (recomputed later)", engine.stats.preemptions),
                    "tpustack_engine_steps": ("engine steps run", engine.stats.steps),
                    "tpustack_prefix_cache_queries": ("full prompt pages looked up", pool.stats.prefix_queries),
                    "tpustack_prefix_cache_hits": ("of those, found in the cache", pool.stats.prefix_hits)}
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)


# ---- request parsing ------------------------------------------------------------------
