"""The conversations API: the caller's stored conversations (pichat/router/daemon/memory.py
keeps them), listed, created, read, renamed, deleted, and continued one message at a time.

    GET    /v1/conversations             the caller's stored conversations (?limit, ?offset)
    POST   /v1/conversations             a new one ({"title"})
    GET    /v1/conversations/{id}        one, with its messages (?offset, ?limit)
    PATCH  /v1/conversations/{id}        rename it ({"title"})
    DELETE /v1/conversations/{id}        delete it
    POST   /v1/conversations/{id}/messages   a turn: only the new message is sent, the
                                         router adds the history
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from pichat.client import new_id
from pichat.errors import ErrorCode, PichatError
from pichat.memory.store import NotFound
from pichat.protocol import Conversations
from pichat.router.api import openai
from pichat.router.api.openai import ApiError, ChatCall
from pichat.router.api.streams import RouterFace, answer, read_json

__all__ = ["routes"]


def routes(router: RouterFace, *, body_timeout: float,
           default_max_tokens: int) -> list[web.RouteDef]:
    """The conversations API's routes on `router`."""

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
        title = title_of(await read_json(request, body_timeout))
        return web.json_response(await ask_store(request, Conversations("create",
                                                                        title=title)),
                                 status=201)

    async def get_conversation(request: web.Request) -> web.Response:
        offset, limit = paging(request)
        return web.json_response(await ask_store(request, Conversations(
            "get", id=request.match_info["id"][:200], offset=offset, limit=limit)))

    async def rename_conversation(request: web.Request) -> web.Response:
        title = title_of(await read_json(request, body_timeout))
        return web.json_response(await ask_store(request, Conversations(
            "rename", id=request.match_info["id"][:200], title=title)))

    async def delete_conversation(request: web.Request) -> web.Response:
        return web.json_response(await ask_store(request, Conversations(
            "delete", id=request.match_info["id"][:200])))

    async def conversation_turn(request: web.Request) -> web.StreamResponse:
        body = await read_json(request, body_timeout)
        if not isinstance(body, dict) or not isinstance(body.get("content"), str) \
                or not body["content"].strip():
            raise ApiError(400, "'content' must be the new message's text", param="content")
        fields = {k: v for k, v in body.items() if k != "content"}
        fields["messages"] = [{"role": "user", "content": body["content"]}]
        call = openai.parse_chat(fields, new_id(), default_max_tokens=default_max_tokens)
        conversation = request.match_info["id"][:200]
        call = ChatCall(replace(call.request, conversation=conversation), call.model,
                        call.stream, call.include_usage, call.kind)
        return await answer(router, request, call)

    return [
        web.get("/v1/conversations", list_conversations),
        web.post("/v1/conversations", create_conversation),
        web.get("/v1/conversations/{id}", get_conversation),
        web.patch("/v1/conversations/{id}", rename_conversation),
        web.delete("/v1/conversations/{id}", delete_conversation),
        web.post("/v1/conversations/{id}/messages", conversation_turn),
    ]
