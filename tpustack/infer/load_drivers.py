"""Run a serving workload (tpustack.infer.loadgen) four ways, one Record per request:

- `run_engine`: the continuous-batching Engine in this process (no HTTP in the figures);
- `run_static`: static batches through the one decode loop (Generator), padded to the
  longest prompt and run until the longest output ends: the baseline continuous batching
  must beat;
- `run_hf`: the same batches through transformers' `generate` (left-padded, greedy);
- `run_http`: streamed /v1/completions against a running server (httpx, asyncio).

Static and HF batches take up to `batch` requests that have been sent by the time the
previous batch ends. Their rows are timed as if each row's tokens streamed out as they
were computed (generous to the baseline): the decode loop's rows are read every `rounds`
rounds and the tokens of a read are spread evenly over it; transformers' steps are timed by
a logits processor. Every driver decodes greedily to exactly max_tokens (no EOS), so the
same request gives the same tokens in every mode up to numerics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
import time
from typing import Any, Callable, Iterator

import numpy as np
from tqdm.auto import tqdm

from tpustack.infer.decode import Generator, finished_tokens
from tpustack.infer.engine import Engine
from tpustack.infer.loadgen import Clients, Record, Workload
from tpustack.infer.sampling import SamplingParams, stack_params


def _clock() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0


def _wait_until(t: float, clock: Callable[[], float]) -> None:
    time.sleep(max(t - clock(), 0.0))


def progress(total: int, desc: str) -> tqdm:
    """Requests finished, with ETA, on stderr: a static pass over 128 requests runs for many
    minutes on 2 CPU cores, and the table comes only at the end."""
    return tqdm(total=total, desc=desc, unit="req", file=sys.stderr, mininterval=5.0, dynamic_ncols=True)


class _EngineTally:
    """What the engine did over a run: KV slots used vs allocated (and what a contiguous
    max-length cache would hold), prefix-cache hits, and the steps that decoded a full batch."""

    def __init__(self, engine: Engine):
        self.engine, self.stats0 = engine, dataclasses.replace(engine.stats)
        self.queries0, self.hits0 = engine.pool.stats.prefix_queries, engine.pool.stats.prefix_hits
        self.shapes0 = engine.compiled_shapes()
        self.used = self.allocated = self.contiguous_used = self.contiguous = 0  # KV token slots, summed
        self.full_decode: list[tuple[float, int]] = []  # (seconds, context tokens) of steps decoding max_seqs

    def step(self, seconds: float, tokens: int, events: int) -> None:
        engine, pool = self.engine, self.engine.pool
        held = sum(r.computed for r in engine.running)
        shared = sum(pool.refcount) - pool.in_use()  # extra holders of shared (full) pages
        self.used += held - shared * pool.page_size
        self.allocated += pool.in_use() * pool.page_size
        self.contiguous_used += held
        self.contiguous += len(engine.running) * engine.cfg.max_seq_len
        if tokens == events == engine.ecfg.max_seqs:  # every sequence fed one token and sampled one
            self.full_decode.append((seconds, held))

    def figures(self) -> dict:
        e, s0 = self.engine, self.stats0
        out = {"steps": e.stats.steps - s0.steps, "preemptions": e.stats.preemptions - s0.preemptions,
               "padded_token_share": _ratio(e.stats.padded_tokens - s0.padded_tokens,
                                            e.stats.padded_tokens - s0.padded_tokens
                                            + e.stats.scheduled_tokens - s0.scheduled_tokens),
               "kv_waste_paged": 1 - _ratio(self.used, self.allocated) if self.allocated else None,
               "kv_waste_contiguous_max_len": 1 - _ratio(self.contiguous_used, self.contiguous)
               if self.contiguous else None,
               "prefix_cache_hit_rate": _ratio(e.pool.stats.prefix_hits - self.hits0,
                                               e.pool.stats.prefix_queries - self.queries0),
               "pages_in_use_after": e.pool.in_use(), "compiled_shapes_during_run": e.compiled_shapes() - self.shapes0}
        if self.full_decode:  # model FLOPs: 2 per weight of a matmul per token, plus attention over the context
            cfg, seqs = e.cfg, e.ecfg.max_seqs
            # an untied embedding's lookup is no matmul
            weights = cfg.num_params() - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
            seconds = float(np.median([t for t, _ in self.full_decode]))
            context = float(np.median([c for _, c in self.full_decode]))
            flops = 2 * weights * seqs + 4 * cfg.num_layers * cfg.num_heads * cfg.heads_dim * context
            out["full_batch_decode"] = {"sequences": seqs, "steps": len(self.full_decode), "median_step_s": seconds,
                                        "tokens_per_s": seqs / seconds, "gflops": flops / seconds / 1e9}
        return out


def run_engine(engine: Engine, workload: Workload, concurrency: int | None = None,
               desc: str = "engine") -> tuple[list[Record], dict]:
    """(records, engine figures) of the workload through the engine, stepped on this thread."""
    clients, clock, tally = Clients(workload, concurrency), _clock(), _EngineTally(engine)
    bar = progress(len(workload), desc)
    records: list[Record] = [None] * len(workload)  # type: ignore[list-item]
    live: dict[int, int] = {}  # engine request id -> workload index
    while clients.left() or engine.has_work():
        while (t := clients.send_time()) is not None and t <= clock():
            i, sent = clients.send()
            live[engine.add(workload.prompts[i], workload.max_tokens[i])] = i
            records[i] = Record(i, len(workload.prompts[i]), sent, tokens=[])
        if not engine.has_work():
            _wait_until(clients.send_time(), clock)
            continue
        start, scheduled = clock(), engine.stats.scheduled_tokens
        events = engine.step()
        now = clock()
        tally.step(now - start, engine.stats.scheduled_tokens - scheduled, len(events))
        for ev in events:
            rec = records[live[ev.id]]
            if ev.token is not None:
                rec.tokens.append(ev.token)
                rec.times.append(now)
                rec.n_out += 1
            if ev.finish_reason is not None:
                engine.forget(ev.id)
                del live[ev.id]
                clients.done(now)
                bar.update()
                if ev.finish_reason not in ("stop", "length"):
                    rec.error = f"finish_reason {ev.finish_reason}"
    bar.close()
    return records, tally.figures()


def _ratio(a: int, b: int) -> float:
    return a / b if b else 0.0


def _batches(workload: Workload, batch: int, concurrency: int | None, run_batch: Callable,
             desc: str) -> list[Record]:
    """Static batching's loop: wait for a request, take up to `batch` sent ones, run them."""
    clients, clock, bar = Clients(workload, concurrency), _clock(), progress(len(workload), desc)
    records: list[Record] = [None] * len(workload)  # type: ignore[list-item]
    while clients.left():
        _wait_until(clients.send_time(), clock)
        rows = []
        while len(rows) < batch and (t := clients.send_time()) is not None and t <= clock():
            i, sent = clients.send()
            rows.append(i)
            records[i] = Record(i, len(workload.prompts[i]), sent)
        run_batch([workload.prompts[i] for i in rows], [workload.max_tokens[i] for i in rows],
                  [records[i] for i in rows], clock)
        for i in rows:
            clients.done(records[i].times[-1])
        bar.update(len(rows))
    bar.close()
    return records


def _spread(times: list[float], new: int, start: float, end: float) -> None:
    times.extend(start + (end - start) * (k + 1) / new for k in range(new))


def run_static(gen: Generator, workload: Workload, batch: int, concurrency: int | None = None,
               rounds: int = 8, desc: str = "static") -> tuple[list[Record], dict]:
    """(records, figures) of the workload in static pad-to-longest batches through the decode loop."""
    shapes = lambda: gen._prefill._cache_size() + gen._decode._cache_size()  # noqa: E731
    before = shapes()

    def run_batch(prompts, max_new, recs, clock) -> None:
        params = [SamplingParams()] * len(prompts)
        state = gen.start(prompts, max_new, params)
        stacked, seen, last = stack_params(params), [0] * len(prompts), None
        while True:
            counts = np.asarray(state.count_B)  # waits for the device
            now = clock()
            for rec, count, old in zip(recs, counts, seen):
                if count > old:
                    _spread(rec.times, int(count - old), now if last is None else last, now)
            seen, last = counts.tolist(), now
            if bool(np.all(np.asarray(state.done_B))):
                break
            state = gen.decode(state, stacked, rounds)
        for rec, toks in zip(recs, finished_tokens(state)):
            rec.tokens, rec.n_out = toks, len(toks)

    records = _batches(workload, batch, concurrency, run_batch, desc)
    return records, {"compiled_shapes_during_run": shapes() - before}


def hf_model(cfg, params) -> Any:
    """transformers' LlamaForCausalLM (float32, eval) with these weights, through the HF export."""
    import tempfile

    import jax
    import torch
    import transformers

    from tpustack.interop.hf import save_hf_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        save_hf_checkpoint(tmp, jax.device_get(params), cfg)
        model = transformers.LlamaForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # decode to max_new_tokens, as the other modes
    model.generation_config.pad_token_id = 0
    return model


def run_hf(model, workload: Workload, batch: int, concurrency: int | None = None,
           desc: str = "hf") -> tuple[list[Record], dict]:
    """(records, {}) of the workload in left-padded batches through transformers' greedy generate."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):  # called once per generated token, right before it is chosen
        def __init__(self, clock):
            self.clock, self.times = clock, []

        def __call__(self, input_ids, scores):
            self.times.append(self.clock())
            return scores

    def run_batch(prompts, max_new, recs, clock) -> None:
        width = max(map(len, prompts))
        ids = torch.zeros((len(prompts), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        stamp = Stamp(clock)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max(max_new), do_sample=False,
                                 logits_processor=LogitsProcessorList([stamp]))
        for row, (rec, n) in enumerate(zip(recs, max_new)):
            rec.tokens = out[row, width:width + n].tolist()
            rec.n_out, rec.times = len(rec.tokens), stamp.times[:n]

    return _batches(workload, batch, concurrency, run_batch, desc), {}


def run_http(url: str, workload: Workload, concurrency: int | None = None, model: str | None = None,
             api_key: str | None = None, duration: float | None = None, timeout: float = 600.0) -> list[Record]:
    """Stream the workload's requests to a server's /v1/completions. With `duration`,
    `concurrency` clients send request after request (cycling the workload) until it passes."""
    return asyncio.run(_run_http(url, workload, concurrency, model, api_key, duration, timeout))


async def _run_http(url, workload: Workload, concurrency, model, api_key, duration, timeout) -> list[Record]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    width = concurrency or len(workload)
    limits = httpx.Limits(max_connections=width + 4, max_keepalive_connections=width + 4)
    async with httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers, timeout=timeout,
                                 limits=limits) as client:
        if model is None:
            r = await client.get("/v1/models")
            r.raise_for_status()
            model = r.json()["data"][0]["id"]
        clock, records = _clock(), []

        async def one(i: int) -> Record:
            rec = Record(i, len(workload.prompts[i]), clock())
            await _stream(client, model, workload.prompts[i], workload.max_tokens[i], rec, clock)
            return rec

        if duration is not None:
            if not concurrency:
                raise ValueError("a timed run needs a number of clients (concurrency)")
            sent = iter(range(1 << 62))

            async def client_loop() -> None:
                while clock() < duration:
                    records.append(await one(next(sent) % len(workload)))
            await asyncio.gather(*(client_loop() for _ in range(concurrency)))
            return records

        gate = asyncio.Semaphore(width)

        async def timed(i: int) -> Record:
            await asyncio.sleep(max(workload.arrivals[i] - clock(), 0.0))
            async with gate:
                return await one(i)
        return list(await asyncio.gather(*(timed(i) for i in range(len(workload)))))


async def _stream(client, model: str, prompt: list[int], max_tokens: int, rec: Record, clock) -> None:
    """One streamed greedy completion; chunk arrival times, usage's token count, or an error."""
    import httpx

    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    done = False
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    rec.error = f"stream error: {chunk['error'].get('message')}"
                for c in chunk.get("choices") or []:
                    if c.get("text") or (c.get("finish_reason") and not rec.times):
                        rec.times.append(clock())
                    if c.get("finish_reason") not in (None, "stop", "length"):
                        rec.error = f"finish_reason {c['finish_reason']}"
                if chunk.get("usage"):
                    rec.n_out = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"
        return
    if not done and rec.error is None:
        rec.error = "the stream ended without [DONE]"


@contextlib.contextmanager
def local_server(app, timeout: float = 60.0) -> Iterator[str]:
    """An ASGI app under uvicorn on a free 127.0.0.1 port, in a thread: yields its base URL,
    then stops it (uvicorn finishes open requests; the app's shutdown drains its runner)."""
    import socket
    import threading

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout)
