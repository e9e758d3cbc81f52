"""The router's HTTP face (aiohttp), on the router's own event loop and request path.

    GET  /                       the web chat page (static; it asks for a key if needed)
    GET  /health                 liveness (never needs a key)
    GET  /metrics                Prometheus
    GET  /v1/cluster             the cluster snapshot (as `pichat status --json`)
    GET  /v1/models              the models live workers serve
    POST /v1/chat/completions    OpenAI-compatible chat, streaming (SSE) or not
    POST /v1/completions         OpenAI-compatible plain completion
    POST /v1/embeddings          OpenAI-compatible embeddings
    POST /api/chat, /api/generate, /api/embed; GET /api/tags, /api/ps; POST /api/show
                                 Ollama's API (pichat/router/api/ollama.py)
    /v1/conversations...         stored conversations (pichat/router/api/conversations.py)

A request goes straight into `Router.submit` with an `HttpSink` and its answer is
written back by pichat/router/api/streams.py: no extra hop. With API
keys configured, everything but `/health` and the page itself needs
`Authorization: Bearer KEY`; the key is the request's owner (fair scheduling, session
ids), else the client's address is. Errors use OpenAI's error shape and status codes;
anything malformed is a 400 naming the field, never a 500. How many connections one peer
may hold, and for how long, is bounded in pichat/router/api/guard.py; a request body
must arrive within `body_timeout` seconds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from aiohttp import web

import pichat
from pichat.client import new_id
from pichat.logs import clip
from pichat.router.api import conversations, ollama, openai
from pichat.router.api.openai import ApiError
from pichat.router.api.streams import (
    ClientGone,
    RouterFace,
    answer,
    check_model,
    embedded,
    error_response,
    ollama_answer,
    read_json,
    session_header,
)
from pichat.router.observe.metrics import CONTENT_TYPE

__all__ = ["create_app", "start_http"]

log = logging.getLogger(__name__)

_PUBLIC = frozenset({"/health", "/health/floating", "/", "/index.html"})


def create_app(router: RouterFace, *, api_keys: tuple[str, ...] = (),
               max_body_bytes: int = 4 << 20, default_max_tokens: int = 512,
               body_timeout: float = 10.0) -> web.Application:
    """The application for `router` (a pichat.router.daemon.router.Router)."""

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
        except ClientGone:
            error = ApiError(499, "the client went away", "cancelled")
        except Exception:
            log.exception("HTTP %s %s failed", request.method, clip(request.path, 80))
            error = ApiError(500, "internal error", "server_error")
        router.stats.http_errors[error.status] += 1
        if request.path.startswith("/api/"):  # Ollama's shape
            return web.json_response({"error": error.message}, status=error.status)
        return error_response(error)

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

    page = files("pichat.router.api").joinpath("static", "index.html").read_text("utf-8")

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "workers": router.worker_count()})

    async def floating_health(request: web.Request) -> web.Response:
        """keepalived's check: 200 where this router may hold the floating address (it
        holds the election's key in etcd, or there is no election: no etcd), else 503."""
        election = router.election
        if election is None or election.holds:
            return web.json_response({"status": "ok", "elected": election is not None})
        return web.json_response({"status": "another router holds the floating address's "
                                            "key in etcd (or this one cannot reach etcd)"},
                                 status=503)

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=router.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def cluster(request: web.Request) -> web.Response:
        return web.json_response(router.snapshot())

    async def models(request: web.Request) -> web.Response:
        return web.json_response(openai.model_list(router.served_models()))

    async def chat(request: web.Request) -> web.StreamResponse:
        call = openai.parse_chat(await read_json(request, body_timeout), new_id(),
                                 session=session_header(request),
                                 default_max_tokens=default_max_tokens)
        return await answer(router, request, call)

    async def completions(request: web.Request) -> web.StreamResponse:
        call = openai.parse_completion(await read_json(request, body_timeout), new_id(),
                                       session=session_header(request),
                                       default_max_tokens=default_max_tokens)
        return await answer(router, request, call)

    async def embeddings(request: web.Request) -> web.Response:
        call = openai.parse_embeddings(await read_json(request, body_timeout), new_id())
        check_model(router, call.request.model)
        router.stats.events["embeddings_requests"] += 1
        router.stats.events["embeddings"] += len(call.request.embed)
        done = await embedded(router, request, call.request)
        return web.json_response(openai.embeddings_object(call, done),
                                 headers={"X-Request-Id": call.request.id})

    # --- Ollama's API (pichat/router/api/ollama.py) ------------------------------------------

    async def ollama_chat(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, body_timeout)
        call = ollama.parse_chat(body, new_id(), default_max_tokens=default_max_tokens)
        return await ollama_answer(router, request, call)

    async def ollama_generate(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, body_timeout)
        if isinstance(body, dict) and not body.get("prompt"):  # Ollama's "load the model"
            return web.json_response({"model": body.get("model", ""), "created_at":
                                      ollama.now(), "response": "", "done": True,
                                      "done_reason": "load"})
        call = ollama.parse_generate(body, new_id(), default_max_tokens=default_max_tokens)
        return await ollama_answer(router, request, call)

    async def ollama_embed(request: web.Request) -> web.Response:
        legacy = request.path.endswith("/embeddings")
        embed, model = ollama.parse_embed(await read_json(request, body_timeout), new_id(),
                                          legacy=legacy)
        check_model(router, embed.model)
        router.stats.events["embeddings_requests"] += 1
        router.stats.events["embeddings"] += len(embed.embed)
        done = await embedded(router, request, embed)
        return web.json_response(ollama.embed_object(model, done, legacy))

    async def ollama_tags(request: web.Request) -> web.Response:
        return web.json_response(ollama.tags(router.worker_facts()))

    async def ollama_ps(request: web.Request) -> web.Response:
        return web.json_response(ollama.ps(router.worker_facts()))

    async def ollama_show(request: web.Request) -> web.Response:
        body = await read_json(request, body_timeout)
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

    app = web.Application(client_max_size=max_body_bytes, middlewares=[errors, auth])
    app.add_routes([
        web.get("/", index),
        web.get("/index.html", index),
        web.get("/health", health),
        web.get("/health/floating", floating_health),
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
        *conversations.routes(router, body_timeout=body_timeout,
                              default_max_tokens=default_max_tokens),
    ])
    return app


_GUARD = web.AppKey("pichat.guard", list)
"""The site's gate (pichat/router/api/guard.py), once it exists: told which connections
carried an authenticated request."""


def _trusted(request: web.Request) -> None:
    for site in request.config_dict.get(_GUARD, ()):
        site.trust(request.transport)


async def start_http(router: Any) -> tuple[web.AppRunner, Any]:
    """Serve `router`'s HTTP face on `router.config.http`: (the runner, the site)."""
    from pichat.router.api.guard import GuardedSite

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
