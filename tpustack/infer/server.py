"""An OpenAI-compatible HTTP server over the Runner (issue 11, item 3; chapter 30.5).

A starlette app: `/v1/completions` and `/v1/chat/completions` (both streaming by SSE),
`/v1/models`, `/health`, `/metrics` (Prometheus). Each request (n choices: n engine
requests) is submitted to the Runner, whose engine thread hands every StepOutput to this
event loop through `call_soon_threadsafe`. A task watches the connection: when the client
goes away, the request's engine requests are cancelled and their pages are free before the
engine's next step. Bad requests answer 4xx with an OpenAI-style error body naming the
field; they are refused before anything reaches the engine, so requests in flight never
notice. Latency metrics come from the engine's own per-request times (arrival, each
token, finish), read once a request ends.

Chat prompts: the checkpoint's jinja2 chat template (tokenizer_config.json's
`chat_template`, or chat_template.jinja) rendered in jinja2's sandbox, else
DEFAULT_CHAT_TEMPLATE: `<|role|>\\ncontent\\n` per message, then `<|assistant|>\\n`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tpustack.data.chat import DEFAULT_CHAT_TEMPLATE, load_chat_template  # noqa: F401 (re-exported)
from tpustack.errors import UserError
from tpustack.infer.runner import Runner
from tpustack.infer.openai_api import (APIError, Params, ServerConfig, field, json_body,
                                         param_of, parse_params)
from tpustack.infer.serve_metrics import Metrics

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclasses.dataclass
class _Choice:
    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    tops: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    sent: int = 0  # characters of text already streamed
    finish_reason: str | None = None


class Server:
    """The app's state: runner, tokenizer, chat template, metrics, limits."""

    def __init__(self, runner: Runner, tokenizer, scfg: ServerConfig = ServerConfig(),
                 chat_template: str | None = None, bos_token: str = "", eos_token: str = ""):
        if tokenizer is None:
            raise UserError("--checkpoint: has no tokenizer; the server needs one to read and write text")
        self.runner, self.tok, self.scfg = runner, tokenizer, scfg
        self.metrics = Metrics(runner)
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(chat_template or DEFAULT_CHAT_TEMPLATE)
        self.special = {"bos_token": bos_token, "eos_token": eos_token}
        self.created = int(time.time())

    # -- text -------------------------------------------------------------------------

    def text(self, choice: _Choice, stop: tuple[str, ...], final: bool) -> str:
        """The choice's text: cut at the first stop string; while running, hold back what
        could still become a stop string or an incomplete character."""
        text = self.tok.decode(choice.tokens)
        cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
        if cuts:
            return text[:min(cuts)]
        if final:
            return text
        if stop:
            text = text[:max(len(text) - max(map(len, stop)) + 1, 0)]
        return text.rstrip("\ufffd")

    def _piece(self, token: int) -> str:
        return self.tok.decode([token])

    def logprobs(self, choice: _Choice, start: int, chat: bool, offset: int = 0) -> dict | None:
        toks, lps, tops = choice.tokens[start:], choice.logprobs[start:], choice.tops[start:]
        if chat:
            entry = lambda t, lp: {"token": (s := self._piece(t)), "logprob": lp,  # noqa: E731
                                   "bytes": list(s.encode("utf-8"))}
            return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                                for t, lp, top in zip(toks, lps, tops or [[]] * len(toks))]}
        pieces = [self._piece(t) for t in toks]
        offsets = [offset + sum(map(len, pieces[:i])) for i in range(len(pieces))]
        return {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets,
                "top_logprobs": [self._top(top) for top in tops] if tops else None}

    def _top(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Completions' {text: logprob}; tokens that decode alike keep the likeliest."""
        out: dict[str, float] = {}
        for i, v in top:
            out.setdefault(self._piece(i), v)
        return out

    # -- requests ----------------------------------------------------------------------

    def prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            messages = field(body, "messages", list)
            if not messages:
                raise APIError(400, "messages: give at least one message", "messages")
            clean = []
            for i, m in enumerate(messages):
                if not isinstance(m, dict) or m.get("role") not in ROLES:
                    raise APIError(400, f"messages[{i}].role: must be one of {ROLES}", "messages")
                content = m.get("content") or ""
                if isinstance(content, list):  # content parts: text only
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise APIError(400, f"messages[{i}].content: only text parts are supported", "messages")
                    content = "".join(p["text"] for p in content)
                if not isinstance(content, str):
                    raise APIError(400, f"messages[{i}].content: expected a string", "messages")
                clean.append({**m, "content": content})
            try:
                text = self.template.render(messages=clean, add_generation_prompt=True, **self.special)
            except jinja2.TemplateError as e:
                raise APIError(400, f"messages: the chat template refused them ({e})", "messages") from None
            return self.tok.encode(text).tolist()
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            return self.tok.encode(prompt).tolist()
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            return list(prompt)
        raise APIError(400, "prompt: expected a non-empty string or array of token ids (one prompt per request)",
                       "prompt")

    async def handle(self, request: HTTPRequest, chat: bool) -> Response:
        body = await json_body(request, self.scfg.max_request_bytes)
        model = field(body, "model", str, self.scfg.model_name)
        if model != self.scfg.model_name:
            raise APIError(404, f"model {model!r}: this server serves {self.scfg.model_name!r}", "model",
                           code="model_not_found")
        ids = self.prompt_ids(body, chat)
        engine = self.runner.engine
        p = parse_params(body, self.scfg, len(ids), engine.cfg.max_seq_len, engine.ecfg.max_top_logprobs, chat)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        handles = []

        def submit(i: int):
            def on_output(out) -> None:  # on the engine thread
                try:
                    loop.call_soon_threadsafe(events.put_nowait, (i, out))
                except RuntimeError:  # the event loop has closed: nobody is listening
                    pass
            return self.runner.submit(ids, p.max_tokens, on_output, sampling=p.sampling[i], stop=p.stop,
                                      logprobs=p.logprobs)

        watcher = asyncio.create_task(self._cancel_on_disconnect(request, handles))
        try:
            for i in range(len(p.sampling)):
                handles.append(await run_in_threadpool(submit, i))
        except UserError as e:
            self._cancel(handles)
            watcher.cancel()
            if self.runner.error is not None or "shutting down" in str(e):
                raise APIError(503, str(e), None, kind="server_error") from None
            raise APIError(400, str(e), param_of(str(e))) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if p.stream:
            return StreamingResponse(self._stream(rid, ids, p, chat, events, handles, watcher),
                                     media_type="text/event-stream")
        try:
            choices = [_Choice(i) for i in range(len(handles))]
            while any(c.finish_reason is None for c in choices):
                i, out = await events.get()
                self._take(choices[i], out)
        finally:
            self._cancel(handles)
            watcher.cancel()
        if any(c.finish_reason == "error" for c in choices):
            raise APIError(500, "the engine failed; see the server's log", None, kind="server_error")
        out = []
        for c in choices:
            text = self.text(c, p.stop, final=True)
            lp = None if p.logprobs is None else self.logprobs(c, 0, chat)
            item = {"index": c.index, "logprobs": lp, "finish_reason": _reason(c.finish_reason)}
            item.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
            out.append(item)
        return JSONResponse({"id": rid, "object": "chat.completion" if chat else "text_completion",
                             "created": int(time.time()), "model": self.scfg.model_name, "choices": out,
                             "usage": _usage(ids, choices)})

    @staticmethod
    def _take(choice: _Choice, out) -> None:
        if out.token is not None:
            choice.tokens.append(out.token)
            if out.logprob is not None:
                choice.logprobs.append(out.logprob)
            if out.top is not None:
                choice.tops.append(out.top)
        if out.finish_reason is not None:
            choice.finish_reason = out.finish_reason

    async def _stream(self, rid, ids, p: Params, chat: bool, events: asyncio.Queue, handles, watcher):
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = {"id": rid, "object": kind, "created": int(time.time()), "model": self.scfg.model_name}
        extra = {"usage": None} if p.include_usage else {}
        choices = [_Choice(i) for i in range(len(handles))]
        try:
            if chat:
                for c in choices:
                    delta = {"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}
                    yield _sse({**head, "choices": [delta], **extra})
            while any(c.finish_reason is None for c in choices):
                i, out = await events.get()
                c = choices[i]
                start = len(c.tokens)
                self._take(c, out)
                text = self.text(c, p.stop, final=c.finish_reason is not None)
                delta, offset = text[c.sent:], c.sent
                c.sent = max(c.sent, len(text))
                lp = None if p.logprobs is None or start == len(c.tokens) else self.logprobs(c, start, chat, offset)
                if not delta and lp is None and c.finish_reason is None:
                    continue
                item = {"index": i, "logprobs": lp, "finish_reason": _reason(c.finish_reason)}
                item.update({"delta": {"content": delta}} if chat else {"text": delta})
                yield _sse({**head, "choices": [item], **extra})
            if any(c.finish_reason == "error" for c in choices):
                yield _sse({"error": {"message": "the engine failed; see the server's log", "type": "server_error",
                                      "param": None, "code": None}})
            if p.include_usage:
                yield _sse({**head, "choices": [], "usage": _usage(ids, choices)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the generator is closed) or we are done: free the pages
            self._cancel(handles)
            watcher.cancel()

    def _cancel(self, handles) -> None:
        for h in handles:
            if h.request is None:  # not finished yet
                self.runner.cancel(h)

    async def _cancel_on_disconnect(self, request: HTTPRequest, handles) -> None:
        """Wait for the client to go away, then cancel its requests (the body is read by now)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self._cancel(handles)


def _raise(message: str):
    raise jinja2.TemplateError(message)


def _reason(reason: str | None) -> str | None:
    return {"cancelled": "abort", "error": "abort"}.get(reason, reason)


def _usage(ids: list[int], choices: list[_Choice]) -> dict:
    completion = sum(len(c.tokens) for c in choices)
    return {"prompt_tokens": len(ids), "completion_tokens": completion, "total_tokens": len(ids) + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def create_app(server: Server) -> Starlette:
    """The ASGI app; its shutdown drains the runner (uvicorn stops accepting first)."""
    scfg = server.scfg

    def endpoint(fn, auth: bool = True):
        async def wrapped(request: HTTPRequest) -> Response:
            try:
                if auth and scfg.api_key is not None:
                    given = request.headers.get("authorization", "")
                    if not hmac.compare_digest(given.encode(), f"Bearer {scfg.api_key}".encode()):
                        raise APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`", None,
                                       kind="authentication_error", code="invalid_api_key")
                return await fn(request)
            except APIError as e:
                return e.response()
            except Exception as e:  # noqa: BLE001 - a bug, not the client's fault: still OpenAI's shape
                return APIError(500, f"internal error: {type(e).__name__}: {e}", None, kind="server_error").response()
        return wrapped

    async def models(_):
        engine = server.runner.engine
        return JSONResponse({"object": "list", "data": [
            {"id": scfg.model_name, "object": "model", "created": server.created, "owned_by": "tpustack",
             "max_model_len": engine.cfg.max_seq_len}]})

    async def health(_):
        if server.runner.error is not None:
            return JSONResponse({"status": "error", "error": repr(server.runner.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(_):
        return Response(generate_latest(server.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def not_found(request, exc):
        return APIError(getattr(exc, "status_code", 404), f"{request.url.path}: {getattr(exc, 'detail', '')}",
                        None).response()

    routes = [Route("/v1/completions", endpoint(lambda r: server.handle(r, chat=False)), methods=["POST"]),
              Route("/v1/chat/completions", endpoint(lambda r: server.handle(r, chat=True)), methods=["POST"]),
              Route("/v1/models", endpoint(models), methods=["GET"]),
              Route("/health", endpoint(health, auth=False), methods=["GET"]),
              Route("/metrics", endpoint(metrics, auth=False), methods=["GET"])]

    @asynccontextmanager
    async def lifespan(_app):
        yield
        await run_in_threadpool(server.runner.shutdown, True)

    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: not_found})
