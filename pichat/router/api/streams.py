"""What the HTTP faces share: the router as they see it (`RouterFace`), a request's answer
handed over through a queue (`HttpSink`), bodies read within bounds (`read_json`), and an
answer written back in OpenAI's shapes (`answer`: one JSON object, or server-sent events)
or Ollama's (`ollama_answer`: one object, or JSON lines), tool calls spotted on the way.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from aiohttp import web

from pichat.logs import clip
from pichat.protocol import Chunk, Done, Error, Request, RequestId
from pichat.router.api import ollama, openai
from pichat.router.api.openai import ApiError, ChatCall
from pichat.router.api.tools import Spotter, extract
from pichat.router.observe.metrics import RouterMetrics
from pichat.router.observe.stats import Stats

__all__ = ["ClientGone", "HttpSink", "RouterFace", "answer", "check_model", "embedded",
           "error_response", "ollama_answer", "read_json", "session_header"]

_KEEPALIVE = object()
_GONE = object()


class HttpSink:
    """Hands a request's messages to its HTTP handler through a queue. When the HTTP
    client has gone, it says so (the router cancels the request) and wakes the handler."""

    def __init__(self, request: web.Request) -> None:
        self.key = self
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self._request = request

    def _gone(self) -> bool:
        transport = self._request.transport
        if transport is None or transport.is_closing():
            self.queue.put_nowait(_GONE)
            return True
        return False

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        if self._gone():
            return False
        self.queue.put_nowait(message)
        return True

    def keepalive(self) -> bool:
        if self._gone():
            return False
        self.queue.put_nowait(_KEEPALIVE)
        return True


class ClientGone(Exception):
    """The HTTP client went away while its answer was being written."""


class RouterFace(Protocol):
    """What the HTTP face needs of the router, and all it may touch."""

    stats: Stats
    metrics: RouterMetrics
    election: Any
    """pichat/router/daemon/election.py's Election, or None (GET /health/floating)."""

    def submit(self, request: Request, sink: HttpSink, *, owner: str) -> None: ...

    def cancel(self, job_id: RequestId) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...

    def served_models(self) -> dict[str, float]: ...

    def worker_facts(self) -> list[tuple[Any, float]]: ...

    @property
    def embedder(self) -> Any: ...

    def worker_count(self) -> int: ...

    @property
    def memory(self) -> Any: ...


async def read_json(request: web.Request, timeout: float) -> Any:
    try:
        async with asyncio.timeout(timeout):
            raw = await request.read()  # aiohttp refuses bodies over client_max_size: 413
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout:.0f}s",
                       code="request_timeout") from None
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {clip(str(exc), 120)}") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    if b"\\ud" in raw or b"\\uD" in raw:  # only a \uD800-\uDFFF escape makes a lone one
        if (where := _lone_surrogate(body)) is not None:
            raise ApiError(400, f"'{clip(where, 120)}' is not valid Unicode (a lone UTF-16 "
                           "surrogate)", param=clip(where, 120))
    return body


def _lone_surrogate(body: Any) -> str | None:
    """Where in `body` a string (or key) cannot be UTF-8, as `messages[0].content`; None if
    nowhere. Iterative: json.loads already bounded the depth."""
    todo: list[tuple[str, Any]] = [("", body)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if not _utf8(key):
                    return path
                todo.append((path, item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, str) and not _utf8(value):
            return where or "the body"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def session_header(request: web.Request) -> str | None:
    value = request.headers.get("X-Session-Id")
    if value is None:
        return None
    try:  # aiohttp keeps undecodable header bytes as surrogates
        return openai.text(value, "X-Session-Id", 128) or None
    except ApiError:
        raise ApiError(400, "the X-Session-Id header must be at most 128 characters of "
                       "UTF-8", param="X-Session-Id") from None


def error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return web.json_response(openai.error_body(error), status=error.status, headers=headers)


async def _next(sink: HttpSink, skip_keepalive: bool = True) -> Any:
    while True:
        item = await sink.queue.get()
        if item is _GONE:
            raise ClientGone()
        if item is _KEEPALIVE and skip_keepalive:
            continue
        return item


async def embedded(router: RouterFace, request: web.Request, job: Request) -> Done:
    """An embeddings request's DONE, batched with the same owner's others
    (pichat/router/api/embedbatch.py); an ERROR is raised as an ApiError."""
    answer = await router.embedder.embed(job, request["owner"])
    if isinstance(answer, Error):
        raise openai.status_for(answer.code, answer.message)
    return answer


async def _whole_text(sink: HttpSink, message: Any) -> tuple[str, Done]:
    """The answer's text up to its DONE (from `message` on); an ERROR raised as an
    ApiError (the request is over: nothing to cancel)."""
    parts: list[str] = []
    while not isinstance(message, Done):
        if isinstance(message, Error):
            raise openai.status_for(message.code, message.message)
        parts.append(message.text)
        message = await _next(sink)
    return "".join(parts), message


async def ollama_answer(router: RouterFace, request: web.Request,
                         call: ollama.OllamaCall) -> web.StreamResponse:
    """An answer in Ollama's shapes: one JSON object, or newline-delimited JSON streamed."""
    check_model(router, call.request.model)
    sink = HttpSink(request)
    events = router.stats.events
    events["ollama_requests"] += 1
    events["tool_requests"] += bool(call.request.tools)
    events["structured_requests"] += bool(call.request.format)
    router.submit(call.request, sink, owner=request["owner"])
    finished = False
    try:
        message = await _next(sink)
        if isinstance(message, Error):
            finished = True
            raise openai.status_for(message.code, message.message)
        spotter = Spotter(call.calls) if call.calls is not None else None
        if not call.stream:
            answer, message = await _whole_text(sink, message)
            finished = True
            found: list = []
            if call.calls is not None:
                answer, found = extract(answer, call.calls)
            events["tool_calls"] += len(found)
            return web.json_response(ollama.final(call, message, answer, found))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        while True:
            if isinstance(message, Chunk):
                out = spotter.feed(message.text) if spotter is not None else message.text
                if out:
                    await _line(response, ollama.line(call, out))
            elif isinstance(message, Done):
                rest, found = spotter.finish() if spotter is not None else ("", [])
                events["tool_calls"] += len(found)
                if rest or found:
                    await _line(response, ollama.line(call, rest, found))
                await _line(response, ollama.final(call, message))
                break
            elif isinstance(message, Error):
                await _line(response, {"error": message.message})
                break
            message = await _next(sink)
        finished = True
        await response.write_eof()
        return response
    finally:
        if not finished:
            router.cancel(call.request.id)


async def _line(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(json.dumps(payload, separators=(",", ":")).encode() + b"\n")


def check_model(router: RouterFace, model: str | None) -> None:
    served = router.served_models()
    if model is not None and served and model not in served:
        raise ApiError(404, f"the model {clip(model, 60)!r} is not served here; "
                       f"models: {clip(', '.join(sorted(served)), 200)}",
                       "invalid_request_error", "model_not_found", "model")


async def answer(router: RouterFace, request: web.Request,
                  call: ChatCall) -> web.StreamResponse:
    check_model(router, call.request.model)
    sink = HttpSink(request)
    events = router.stats.events
    events["tool_requests"] += bool(call.request.tools)
    events["structured_requests"] += bool(call.request.format)
    router.submit(call.request, sink, owner=request["owner"])
    created = openai.now()
    finished = False
    try:
        message = await _next(sink)
        if isinstance(message, Error):
            finished = True
            raise openai.status_for(message.code, message.message)
        if not call.stream:
            answer, message = await _whole_text(sink, message)
            finished = True
            body = openai.completion_object(call, answer, message, created)
            events["tool_calls"] += len(body["choices"][0].get("message", {})
                                        .get("tool_calls") or ())
            return web.json_response(body, headers={"X-Request-Id": call.request.id})
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no", "X-Request-Id": call.request.id})
        await response.prepare(request)
        if call.kind == "chat":
            await _event(response, openai.chunk_object(call, created, first=True, text=""))
        spotter = Spotter(call.calls) if call.calls is not None else None
        while True:
            if message is _KEEPALIVE:
                await response.write(b": keepalive\n\n")
            elif isinstance(message, Chunk):
                out = spotter.feed(message.text) if spotter is not None else message.text
                if out:
                    await _event(response, openai.chunk_object(call, created, text=out))
            elif isinstance(message, Done):
                found: list = []
                if spotter is not None:
                    rest, found = spotter.finish()
                    if rest:
                        await _event(response, openai.chunk_object(call, created, text=rest))
                    if found:
                        events["tool_calls"] += len(found)
                        await _event(response, openai.chunk_object(call, created, calls=found))
                await _event(response, openai.chunk_object(call, created, done=message,
                                                           called=bool(found)))
                if call.include_usage:
                    await _event(response, openai.chunk_object(call, created, done=message,
                                                               usage_only=True))
                break
            else:  # an ERROR after the stream started (e.g. the worker was lost)
                error = openai.status_for(message.code, message.message)
                await _event(response, openai.error_body(error))
                break
            message = await _next(sink, skip_keepalive=False)
        finished = True
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
    finally:
        if not finished:
            router.cancel(call.request.id)


async def _event(response: web.StreamResponse, payload: dict[str, Any]) -> None:
    await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")
