"""The router's HTTP face (aiohttp), on the router's own event loop and request path.

    GET  /                       the web chat page (static; it asks for a key if needed)
    GET  /health                 liveness (never needs a key)
    GET  /metrics                Prometheus
    GET  /v1/cluster             the cluster snapshot (as `pichat status --json`)
    GET  /v1/models              the models live workers serve
    POST /v1/chat/completions    OpenAI-compatible chat, streaming (SSE) or not
    POST /v1/completions         OpenAI-compatible plain completion

    GET    /v1/conversations             the caller's stored conversations (?limit, ?offset)
    POST   /v1/conversations             a new one ({"title"})
    GET    /v1/conversations/{id}        one, with its messages (?offset, ?limit)
    PATCH  /v1/conversations/{id}        rename it ({"title"})
    DELETE /v1/conversations/{id}        delete it
    POST   /v1/conversations/{id}/messages   a turn: {"content", and chat completion
                                         fields: stream, max_tokens, temperature, ...};
                                         only the new message is sent, the router adds
                                         the history; answered as a chat completion
                                         (its `pichat.conversation` names the id)

A request goes straight into `Router.submit` with an `HttpSink`: no extra hop. With API
keys configured, everything but `/health` and the page itself needs
`Authorization: Bearer KEY`; the key is the request's owner (fair scheduling, session
ids), else the client's address is. Errors use OpenAI's error shape and status codes;
anything malformed is a 400 naming the field, never a 500. How many connections one peer
may hold, and for how long, is bounded in pichat/router/httpguard.py; a request body
must arrive within `body_timeout` seconds.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from importlib.resources import files
from typing import Any, Protocol

from aiohttp import web

import pichat
from pichat.client import new_id
from pichat.errors import ErrorCode, PichatError
from pichat.logs import clip
from pichat.memory.store import NotFound
from pichat.protocol import Chunk, Conversations, Done, Error, Request, RequestId
from pichat.router import ollama, openai
from pichat.router.metrics import CONTENT_TYPE, RouterMetrics
from pichat.router.openai import ApiError, ChatCall
from pichat.router.stats import Stats
from pichat.router.tools import Spotter, extract

__all__ = ["HttpSink", "RouterFace", "create_app", "start_http"]

log = logging.getLogger(__name__)

_KEEPALIVE = object()
_GONE = object()
_PUBLIC = frozenset({"/health", "/", "/index.html"})


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


class _ClientGone(Exception):
    pass


class RouterFace(Protocol):
    """What the HTTP face needs of the router, and all it may touch."""

    stats: Stats
    metrics: RouterMetrics

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


def create_app(router: RouterFace, *, api_keys: tuple[str, ...] = (),
               max_body_bytes: int = 4 << 20, default_max_tokens: int = 512,
               body_timeout: float = 10.0) -> web.Application:
    """The application for `router` (a pichat.router.service.Router)."""

    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request],
                                                              Awaitable[web.StreamResponse]]):
        try:
            return await handler(request)
        except ApiError as exc:
            error = exc
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
            error = ApiError(exc.status, exc.reason or exc.text or "error", kind,
                             code.get(exc.status))
        except _ClientGone:
            error = ApiError(499, "the client went away", "cancelled")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, clip(request.path, 80))
            error = ApiError(500, "internal error", "server_error")
        router.stats.http_errors[error.status] += 1
        if request.path.startswith("/api/"):  # Ollama's shape
            return web.json_response({"error": error.message}, status=error.status)
        return _error_response(error)

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request],
                                                            Awaitable[web.StreamResponse]]):
        if api_keys and request.path not in _PUBLIC:
            given = request.headers.get("Authorization", "")
            token = given[7:].strip() if given[:7].lower() == "bearer " else ""
            raw = token.encode("utf-8", "surrogateescape")
            matched = [k for k in api_keys if hmac.compare_digest(raw, k.encode())]
            if not matched:
                raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                               "authentication_error", "invalid_api_key")
            request["owner"] = "api:" + hashlib.blake2b(matched[0].encode(),
                                                        digest_size=8).hexdigest()
            _trusted(request)
        else:
            request["owner"] = f"ip:{request.remote}"
            if not api_keys:
                _trusted(request)
        return await handler(request)

    page = files("pichat.router").joinpath("static", "index.html").read_text("utf-8")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": router.worker_count()})

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=router.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def cluster(request: web.Request) -> web.Response:
        return web.json_response(router.snapshot())

    async def models(request: web.Request) -> web.Response:
        return web.json_response(openai.model_list(router.served_models()))

    async def chat(request: web.Request) -> web.StreamResponse:
        call = openai.parse_chat(await _json(request, body_timeout), new_id(),
                                 session=_session_header(request),
                                 default_max_tokens=default_max_tokens)
        return await _answer(router, request, call)

    async def completions(request: web.Request) -> web.StreamResponse:
        call = openai.parse_completion(await _json(request, body_timeout), new_id(),
                                       session=_session_header(request),
                                       default_max_tokens=default_max_tokens)
        return await _answer(router, request, call)

    async def embeddings(request: web.Request) -> web.Response:
        call = openai.parse_embeddings(await _json(request, body_timeout), new_id())
        _check_model(router, call.request.model)
        router.stats.events["embeddings_requests"] += 1
        router.stats.events["embeddings"] += len(call.request.embed)
        done = await _embedded(router, request, call.request)
        return web.json_response(openai.embeddings_object(call, done),
                                 headers={"X-Request-Id": call.request.id})

    # --- Ollama's API (pichat/router/ollama.py) ------------------------------------------

    async def ollama_chat(request: web.Request) -> web.StreamResponse:
        body = await _json(request, body_timeout)
        call = ollama.parse_chat(body, new_id(), default_max_tokens=default_max_tokens)
        return await _ollama_answer(router, request, call)

    async def ollama_generate(request: web.Request) -> web.StreamResponse:
        body = await _json(request, body_timeout)
        if isinstance(body, dict) and not body.get("prompt"):  # Ollama's "load the model"
            return web.json_response({"model": body.get("model", ""), "created_at":
                                      ollama.now(), "response": "", "done": True,
                                      "done_reason": "load"})
        call = ollama.parse_generate(body, new_id(), default_max_tokens=default_max_tokens)
        return await _ollama_answer(router, request, call)

    async def ollama_embed(request: web.Request) -> web.Response:
        legacy = request.path.endswith("/embeddings")
        embed, model = ollama.parse_embed(await _json(request, body_timeout), new_id(),
                                          legacy=legacy)
        _check_model(router, embed.model)
        router.stats.events["embeddings_requests"] += 1
        router.stats.events["embeddings"] += len(embed.embed)
        done = await _embedded(router, request, embed)
        return web.json_response(ollama.embed_object(model, done, legacy))

    async def ollama_tags(request: web.Request) -> web.Response:
        return web.json_response(ollama.tags(router.worker_facts()))

    async def ollama_ps(request: web.Request) -> web.Response:
        return web.json_response(ollama.ps(router.worker_facts()))

    async def ollama_show(request: web.Request) -> web.Response:
        body = await _json(request, body_timeout)
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        found = ollama.show(name, router.worker_facts()) if isinstance(name, str) else None
        if found is None:
            raise ApiError(404, f"model {clip(str(name), 60)!r} not found")
        return web.json_response(found)

    async def ollama_version(request: web.Request) -> web.Response:
        return web.json_response({"version": f"0.6.0-pichat-{pichat.__version__}"})

    async def ollama_manage(request: web.Request) -> web.Response:
        raise ApiError(400, "pichat serves the models its workers load: install one with "
                            "`pichat models NAME` on a worker and start it with --model "
                            "(models are not pulled, pushed or deleted through the router)")

    async def ask_store(request: web.Request, query: Conversations) -> Any:
        memory = router.memory
        if memory.busy:
            raise openai.status_for(ErrorCode.BUSY, "the conversation store is busy; retry")
        try:
            return await memory.query(request["owner"], query)
        except NotFound as exc:
            raise ApiError(404, str(exc), code="not_found") from None
        except PichatError as exc:
            raise openai.status_for(exc.code, str(exc)) from None

    def paging(request: web.Request) -> tuple[int, int]:
        try:
            offset = int(request.query.get("offset", 0))
            limit = int(request.query.get("limit", 100))
        except ValueError:
            raise ApiError(400, "offset and limit must be integers") from None
        if not (0 <= offset < 1 << 31 and 1 <= limit <= 1000):
            raise ApiError(400, "offset must be 0 or more, limit 1 to 1000")
        return offset, limit

    def title_of(body: Any) -> str:
        title = body.get("title", "") if isinstance(body, dict) else None
        if not isinstance(title, str) or len(title) > 200:
            raise ApiError(400, "'title' must be a string of at most 200 characters",
                           param="title")
        return title

    async def list_conversations(request: web.Request) -> web.Response:
        offset, limit = paging(request)
        found = await ask_store(request, Conversations("list", offset=offset, limit=limit))
        return web.json_response({"object": "list", "data": found})

    async def create_conversation(request: web.Request) -> web.Response:
        title = title_of(await _json(request, body_timeout))
        return web.json_response(await ask_store(request, Conversations("create",
                                                                        title=title)),
                                 status=201)

    async def get_conversation(request: web.Request) -> web.Response:
        offset, limit = paging(request)
        return web.json_response(await ask_store(request, Conversations(
            "get", id=request.match_info["id"][:200], offset=offset, limit=limit)))

    async def rename_conversation(request: web.Request) -> web.Response:
        title = title_of(await _json(request, body_timeout))
        return web.json_response(await ask_store(request, Conversations(
            "rename", id=request.match_info["id"][:200], title=title)))

    async def delete_conversation(request: web.Request) -> web.Response:
        return web.json_response(await ask_store(request, Conversations(
            "delete", id=request.match_info["id"][:200])))

    async def conversation_turn(request: web.Request) -> web.StreamResponse:
        body = await _json(request, body_timeout)
        if not isinstance(body, dict) or not isinstance(body.get("content"), str) \
                or not body["content"].strip():
            raise ApiError(400, "'content' must be the new message's text", param="content")
        fields = {k: v for k, v in body.items() if k != "content"}
        fields["messages"] = [{"role": "user", "content": body["content"]}]
        call = openai.parse_chat(fields, new_id(), default_max_tokens=default_max_tokens)
        conversation = request.match_info["id"][:200]
        call = ChatCall(replace(call.request, conversation=conversation), call.model,
                        call.stream, call.include_usage, call.kind)
        return await _answer(router, request, call)

    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors, auth])
    app.add_routes([
        web.get("/", index),
        web.get("/index.html", index),
        web.get("/health", health),
        web.get("/metrics", metrics),
        web.get("/v1/cluster", cluster),
        web.get("/v1/models", models),
        web.post("/v1/chat/completions", chat),
        web.post("/v1/completions", completions),
        web.post("/v1/embeddings", embeddings),
        web.post("/api/chat", ollama_chat),
        web.post("/api/generate", ollama_generate),
        web.post("/api/embed", ollama_embed),
        web.post("/api/embeddings", ollama_embed),
        web.get("/api/tags", ollama_tags),
        web.get("/api/ps", ollama_ps),
        web.post("/api/show", ollama_show),
        web.get("/api/version", ollama_version),
        *(web.route("*", f"/api/{name}", ollama_manage) for name in ollama.MANAGEMENT),
        web.get("/v1/conversations", list_conversations),
        web.post("/v1/conversations", create_conversation),
        web.get("/v1/conversations/{id}", get_conversation),
        web.patch("/v1/conversations/{id}", rename_conversation),
        web.delete("/v1/conversations/{id}", delete_conversation),
        web.post("/v1/conversations/{id}/messages", conversation_turn),
    ])
    return app


async def _json(request: web.Request, timeout: float) -> Any:
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


def _session_header(request: web.Request) -> str | None:
    value = request.headers.get("X-Session-Id")
    if value is None:
        return None
    try:  # aiohttp keeps undecodable header bytes as surrogates
        return openai.text(value, "X-Session-Id", 128) or None
    except ApiError:
        raise ApiError(400, "the X-Session-Id header must be at most 128 characters of "
                       "UTF-8", param="X-Session-Id") from None


def _error_response(error: ApiError) -> web.Response:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
    return web.json_response(openai.error_body(error), status=error.status, headers=headers)


async def _next(sink: HttpSink, skip_keepalive: bool = True) -> Any:
    while True:
        item = await sink.queue.get()
        if item is _GONE:
            raise _ClientGone()
        if item is _KEEPALIVE and skip_keepalive:
            continue
        return item


async def _embedded(router: RouterFace, request: web.Request, job: Request) -> Done:
    """An embeddings request's DONE, batched with the same owner's others
    (pichat/router/embedbatch.py); an ERROR is raised as an ApiError."""
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


async def _ollama_answer(router: RouterFace, request: web.Request,
                         call: ollama.OllamaCall) -> web.StreamResponse:
    """An answer in Ollama's shapes: one JSON object, or newline-delimited JSON streamed."""
    _check_model(router, call.request.model)
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


def _check_model(router: RouterFace, model: str | None) -> None:
    served = router.served_models()
    if model is not None and served and model not in served:
        raise ApiError(404, f"the model {clip(model, 60)!r} is not served here; "
                       f"models: {clip(', '.join(sorted(served)), 200)}",
                       "invalid_request_error", "model_not_found", "model")


async def _answer(router: RouterFace, request: web.Request,
                  call: ChatCall) -> web.StreamResponse:
    _check_model(router, call.request.model)
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


_GUARD = web.AppKey("pichat.guard", list)
"""The site's gate (pichat/router/httpguard.py), once it exists: told which connections
carried an authenticated request."""


def _trusted(request: web.Request) -> None:
    for site in request.config_dict.get(_GUARD, ()):
        site.trust(request.transport)


async def start_http(router: Any) -> tuple[web.AppRunner, Any]:
    """Serve `router`'s HTTP face on `router.config.http`: (the runner, the site)."""
    from pichat.router.httpguard import GuardedSite

    cfg = router.config
    host, _, port = cfg.http.rpartition(":")
    app = create_app(router, api_keys=cfg.api_keys, max_body_bytes=cfg.max_message_bytes,
                     default_max_tokens=cfg.http_max_tokens, body_timeout=cfg.http_body_timeout)
    guard: list[Any] = []
    app[_GUARD] = guard
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=cfg.http_idle_timeout)
    await runner.setup()
    site = GuardedSite(runner, host.strip("[]") or "0.0.0.0", int(port),
                       max_connections=cfg.http_max_connections, backlog=1024)
    guard.append(site)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site
