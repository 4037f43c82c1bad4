"""The engine on its own thread: what a server (or any concurrent caller) talks to.

The Engine is single-threaded by design. The runner owns it on one background thread
that loops: apply queued commands (add, cancel), run one step, hand each StepOutput to
its request's callback. Callers on other threads only queue commands, so a cancel (a
client disconnecting) frees the request's pages before the next step runs. `shutdown`
stops admitting, lets the requests in flight finish (or cancels them), and joins.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable

from tpustack.errors import UserError
from tpustack.infer.engine import Engine, Request, StepOutput

Callback = Callable[[StepOutput], None]


@dataclasses.dataclass
class Handle:
    """A submitted request: its engine id once admitted, and its outputs as they come."""

    runner: "Runner"
    outputs: "queue.Queue[StepOutput]" = dataclasses.field(default_factory=queue.Queue)
    id: int | None = None
    request: Request | None = None  # the engine's record, once finished
    admitted: threading.Event = dataclasses.field(default_factory=threading.Event)
    error: Exception | None = None

    def tokens(self, timeout: float | None = None):
        """Yield output tokens until the request finishes (blocking)."""
        while True:
            out = self.outputs.get(timeout=timeout)
            if out.token is not None:
                yield out.token
            if out.finish_reason is not None:
                return

    def cancel(self) -> None:
        self.runner.cancel(self)


class Runner:
    """Owns an Engine on a background thread; thread-safe submit / cancel / shutdown."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._handles: dict[int, tuple[Handle, Callback | None]] = {}
        self._wake = threading.Event()
        self._closing = False
        self._drain = True
        self.error: BaseException | None = None
        # called on the engine thread with each finished request's record (the server's metrics)
        self.on_finish: Callable[[Request], None] | None = None
        self._thread = threading.Thread(target=self._loop, name="tpustack-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt: list[int], max_tokens: int, on_output: Callback | None = None,
               **kwargs: Any) -> Handle:
        """Queue a request (Engine.add's arguments); raises UserError for a bad request or
        once shutting down. Outputs go to the handle's queue, and to on_output if given
        (called on the engine thread: keep it short, e.g. loop.call_soon_threadsafe)."""
        if self._closing:
            raise UserError("the server is shutting down; retry on another replica")
        handle = Handle(self)
        self._commands.put(("add", handle, on_output, (prompt, max_tokens), kwargs))
        self._wake.set()
        handle.admitted.wait()
        if handle.error is not None:
            raise handle.error
        return handle

    def cancel(self, handle: Handle) -> None:
        """Cancel the request; its pages are free before the engine's next step."""
        self._commands.put(("cancel", handle, None, (), {}))
        self._wake.set()

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; finish (drain) or cancel the requests in flight; join the thread."""
        self._closing, self._drain = True, drain
        self._commands.put(("stop", None, None, (), {}))
        self._wake.set()
        self._thread.join(timeout)

    def _apply(self, command) -> bool:
        kind, handle, callback, args, kwargs = command
        if kind == "add":
            try:
                handle.id = self.engine.add(*args, **kwargs)
                self._handles[handle.id] = (handle, callback)
            except Exception as e:  # noqa: BLE001 - handed back to the submitting thread
                handle.error = e
            handle.admitted.set()
        elif kind == "cancel" and handle.id in self._handles:
            self.engine.cancel(handle.id)
            self._emit(StepOutput(handle.id, None, finish_reason="cancelled"))
        elif kind == "stop":
            return True
        return False

    def _emit(self, out: StepOutput) -> None:
        handle, callback = self._handles[out.id]
        if out.finish_reason is not None:  # the record is on the handle before anyone hears of the end
            del self._handles[out.id]
            handle.request = self.engine.forget(out.id)
            if self.on_finish is not None:
                self.on_finish(handle.request)
        handle.outputs.put(out)
        if callback is not None:
            callback(out)

    def _loop(self) -> None:
        try:
            self._run()
        except BaseException as e:  # a failed step: fail every request rather than hang its caller
            self.error, self._closing = e, True
            for rid in list(self._handles):
                self._emit(StepOutput(rid, None, finish_reason="error"))
            raise
        finally:
            while True:  # whatever arrived after the end: refuse it, never leave a caller waiting
                try:
                    kind, handle, *_ = self._commands.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    handle.error = UserError("the server is shutting down; retry on another replica")
                    handle.admitted.set()

    def _run(self) -> None:
        stopping = False
        while True:
            while True:
                try:
                    stopping |= self._apply(self._commands.get_nowait())
                except queue.Empty:
                    break
            if stopping and not self._drain:
                for rid in list(self._handles):
                    self.engine.cancel(rid)
                    self._emit(StepOutput(rid, None, finish_reason="cancelled"))
            if not self.engine.has_work():
                if stopping:
                    return
                self._wake.wait()
                self._wake.clear()
                continue
            for out in self.engine.step():
                self._emit(out)
