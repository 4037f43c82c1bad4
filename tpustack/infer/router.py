"""The edge-cloud hybrid router (chapter 30.6): a small local model answers when it is
confident over its first tokens, else the request goes to a big model behind an
OpenAI-compatible endpoint (`tpustack serve`, llama.cpp's server).

    probe: the local model decodes greedily `probe_tokens` tokens (the one decode loop);
           one teacher-forced pass over prompt + probe gives the distribution p_t behind
           each probe token (greedy: the probe token is argmax p_t).
    confidence: mean over the probe of max_v p_t(v) ("max_prob", in [0, 1]), or minus the
           mean entropy -sum_v p_t(v) log p_t(v) in nats ("entropy", <= 0);
           higher is surer for both.
    decide: confidence >= threshold -> the local model continues to max_tokens (greedy, so
           the answer equals one straight local decode); else the prompt is forwarded
           (/v1/completions, temperature 0) and the probe is thrown away.

Dimension letters: T sequence, V vocab.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import httpx
import jax
import jax.numpy as jnp
import numpy as np

from tpustack.errors import UserError
from tpustack.infer.decode import Generator, bucket
from tpustack.model import Decoder

MEASURES = ("max_prob", "entropy")


@dataclasses.dataclass(frozen=True)
class RouteConfig:
    threshold: float  # answer locally when confidence >= threshold
    measure: str = "max_prob"  # max_prob | entropy
    probe_tokens: int = 8  # tokens the confidence is measured over
    max_tokens: int = 32  # tokens in an answer, local or remote

    def check(self) -> None:
        if self.measure not in MEASURES:
            raise UserError(f"--measure {self.measure!r}: one of {', '.join(MEASURES)}")
        if not 0 < self.probe_tokens <= self.max_tokens:
            raise UserError(f"--probe-tokens {self.probe_tokens}: must be in 1..--max-tokens ({self.max_tokens})")


def confidence(logp_TV: np.ndarray, measure: str) -> float:
    """Mean max-probability, or minus the mean entropy (nats), of T next-token log-distributions."""
    p_TV = np.exp(logp_TV)
    if measure == "max_prob":
        return float(p_TV.max(axis=-1).mean())
    return float((p_TV * logp_TV).sum(axis=-1).mean())  # -entropy: sum p log p


class LocalModel:
    """A model in this process: greedy decoding (the one decode loop) and teacher-forced scoring."""

    def __init__(self, cfg, params: Any, tokenizer: Any):
        if tokenizer is None:
            raise UserError("--checkpoint: has no tokenizer; the router reads and writes text")
        self.tok = tokenizer
        eos = tokenizer.eos_id if tokenizer.eos_id is not None else -1
        self.gen = Generator(cfg, params, eos_id=eos)
        self.cfg, self.params, self.eos_id = self.gen.cfg, self.gen.params, eos
        model = Decoder(self.cfg)
        self._logp = jax.jit(lambda p, t: jax.nn.log_softmax(model.apply({"params": p}, t).astype(jnp.float32)))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        """Up to n greedy tokens after `ids` (fewer when EOS comes; EOS is not returned)."""
        out = self.gen.generate([list(ids)], n)[0]
        return out[:out.index(self.eos_id)] if self.eos_id in out else out

    def next_logprobs(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """logp_TV [len(answer), V]: the distribution behind each answer token, teacher-forced."""
        ids = list(prompt) + list(answer)
        if len(ids) > self.cfg.max_seq_len:
            raise UserError(f"prompt + answer: {len(ids)} tokens, over the model's {self.cfg.max_seq_len}")
        padded = np.zeros((1, min(bucket(len(ids)), self.cfg.max_seq_len)), np.int32)
        padded[0, :len(ids)] = ids  # right padding: causal attention never sees it
        logp = np.asarray(self._logp(self.params, jnp.asarray(padded)))[0]
        return logp[len(prompt) - 1:len(ids) - 1]

    def loglik(self, prompt: list[int], answer: list[int]) -> np.ndarray:
        """log p(answer_t | prompt, answer_<t) per answer token."""
        logp_TV = self.next_logprobs(prompt, answer)
        return logp_TV[np.arange(len(answer)), np.asarray(answer, np.int64)]


class Cloud:
    """An OpenAI-compatible /v1/completions endpoint; `client` may be any httpx.Client
    (a starlette TestClient serves an app in-process)."""

    def __init__(self, base_url: str = "", model: str = "", api_key: str | None = None,
                 client: httpx.Client | None = None, timeout_s: float = 120.0, extra: dict | None = None):
        self.extra = dict(extra or {})  # more request fields, e.g. llama.cpp's {"repeat_penalty": 1.0}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = client or httpx.Client(timeout=timeout_s)
        self.base, self.model, self.headers = base_url.rstrip("/"), model, headers

    def _call(self, method: str, path: str, **kwargs) -> Any:
        url = self.base + path
        try:
            reply = self.client.request(method, url, headers=self.headers, **kwargs)
        except httpx.HTTPError as e:
            raise UserError(f"--cloud {url}: {type(e).__name__}: {e}; is the server up?") from None
        if reply.status_code != 200:
            raise UserError(f"--cloud {url}: HTTP {reply.status_code}: {reply.text[:300]}")
        return reply.json()

    def complete(self, prompt: str, max_tokens: int) -> str:
        """The endpoint's greedy completion of `prompt` (model: the given id, else the server's first)."""
        if not self.model:
            self.model = self._call("GET", "/models")["data"][0]["id"]
        body = {**self.extra, "model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0}
        return self._call("POST", "/completions", json=body)["choices"][0]["text"]


@dataclasses.dataclass
class Routed:
    text: str
    where: str  # "local" | "cloud"
    confidence: float
    probe_s: float  # seconds to decode and score the probe
    latency_s: float  # seconds from the request to the answer, probe included


class Router:
    """Answers with the local model when it is confident, else with the cloud."""

    def __init__(self, local: LocalModel, cloud: Cloud, rcfg: RouteConfig):
        rcfg.check()
        self.local, self.cloud, self.rcfg = local, cloud, rcfg

    def probe(self, prompt: str) -> tuple[list[int], list[int], float]:
        """(prompt ids, probe tokens, confidence) of the local model's first tokens."""
        ids = self.local.tok.encode(prompt).tolist()
        probe = self.local.greedy(ids, self.rcfg.probe_tokens)
        if not probe:  # EOS first: the local model is done; the surest value of the measure
            return ids, probe, 1.0 if self.rcfg.measure == "max_prob" else 0.0
        return ids, probe, confidence(self.local.next_logprobs(ids, probe), self.rcfg.measure)

    def route(self, prompt: str) -> Routed:
        """The answer to one prompt and where it came from."""
        start = time.perf_counter()
        ids, probe, conf = self.probe(prompt)
        probe_s = time.perf_counter() - start
        if conf >= self.rcfg.threshold:
            rest = self.rcfg.max_tokens - len(probe)
            more = self.local.greedy(ids + probe, rest) if rest and len(probe) == self.rcfg.probe_tokens else []
            text, where = self.local.tok.decode(probe + more), "local"
        else:
            text, where = self.cloud.complete(prompt, self.rcfg.max_tokens), "cloud"
        return Routed(text, where, conf, probe_s, time.perf_counter() - start)
