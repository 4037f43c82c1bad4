"""The OpenAI API's side of `tpustack serve`: server limits, request parsing and validation into
engine sampling parameters, and OpenAI-style errors that name the offending field."""

from __future__ import annotations

import dataclasses
import json
import secrets
from typing import Any

from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse

from tpustack.infer.sampling import SamplingParams


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = "tpustack"
    api_key: str | None = None  # None: no auth; else /v1/* needs `Authorization: Bearer KEY`
    max_request_bytes: int = 1 << 20  # larger bodies answer 413
    max_tokens_limit: int = 4096  # the most tokens one choice may ask for (400 beyond)
    max_n: int = 8
    default_max_tokens: int = 16  # completions' default, as OpenAI's


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


def field(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join({int: "an integer", float: "a number", str: "a string", bool: "a boolean",
                             list: "an array", dict: "an object"}[k] for k in kinds)
        raise APIError(400, f"{name}: expected {names}, got {json.dumps(value)[:40]}", name)
    return value


def check_range(name: str, value, lo, hi, why: str = "") -> None:
    if not lo <= value <= hi:
        raise APIError(400, f"{name} {value}: must be in [{lo}, {hi}]{why}", name)


@dataclasses.dataclass
class Params:
    max_tokens: int
    sampling: list[SamplingParams]  # one per choice
    stop: tuple[str, ...]
    logprobs: int | None
    stream: bool
    include_usage: bool


def parse_params(body: dict, scfg: ServerConfig, prompt_len: int, context: int, max_top: int, chat: bool) -> Params:
    room = max(context - prompt_len, 1)
    name = "max_tokens"
    if chat:
        if body.get("max_completion_tokens") is not None:  # the newer name wins; 0 is refused, not ignored
            name = "max_completion_tokens"
        max_tokens = field(body, name, int)
        max_tokens = min(room, scfg.max_tokens_limit) if max_tokens is None else max_tokens
    else:
        max_tokens = field(body, "max_tokens", int, scfg.default_max_tokens)
    check_range(name, max_tokens, 1, scfg.max_tokens_limit, " (this server's limit)")
    temperature = field(body, "temperature", (int, float), 1.0)
    check_range("temperature", temperature, 0, 2)
    top_p = field(body, "top_p", (int, float), 1.0)
    if not 0 < top_p <= 1:
        raise APIError(400, f"top_p {top_p}: must be in (0, 1]", "top_p")
    top_k = field(body, "top_k", int, 0)
    if top_k < -1:
        raise APIError(400, f"top_k {top_k}: must be >= 0 (0 or -1: off)", "top_k")
    n = field(body, "n", int, 1)
    check_range("n", n, 1, scfg.max_n)
    seed = field(body, "seed", int)
    if seed is None:
        seed = secrets.randbits(31)
    stop = field(body, "stop", (str, list), ())
    stop = (stop,) if isinstance(stop, str) else tuple(stop)
    if len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(400, "stop: at most 4 non-empty strings", "stop")
    if chat:
        top = field(body, "top_logprobs", int)
        logprobs = (top or 0) if field(body, "logprobs", bool, False) else None
        if top is not None and logprobs is None:
            raise APIError(400, "top_logprobs: needs logprobs: true", "top_logprobs")
        name = "top_logprobs"
    else:
        logprobs, name = field(body, "logprobs", int), "logprobs"
    if logprobs is not None:
        check_range(name, logprobs, 0, max_top, " (this server's max_top_logprobs)")
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = field(options, "include_usage", bool, False)
    sampling = [SamplingParams(float(temperature), max(top_k, 0), float(top_p), (seed + i) & 0xFFFFFFFF)
                for i in range(n)]
    return Params(max_tokens, sampling, stop, logprobs, stream, include_usage)


async def json_body(request: HTTPRequest, limit: int) -> dict:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body: {length} bytes is over this server's {limit}", None)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"request body: over this server's {limit} bytes", None)
    try:
        body = json.loads(data)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting too deep for the parser
        raise APIError(400, f"request body: not valid JSON ({e})", None) from None
    if not isinstance(body, dict):
        raise APIError(400, "request body: expected a JSON object", None)
    return body


FIELDS = ("prompt", "messages", "max_tokens", "logprobs", "top_logprobs", "temperature", "top_k", "top_p",
          "seed", "stop", "n")


def param_of(message: str) -> str | None:
    """The field a UserError's message starts with ("max_tokens 9: ...", "prompt: ...")."""
    word = message.split(" ", 1)[0].rstrip(":")
    return word if word in FIELDS else None


# ---- serving ----------------------------------------------------------------------------
