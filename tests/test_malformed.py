"""Malformed input over every HTTP route: each field of a valid request, at every depth,
replaced by each kind of garbage (wrong types, nulls, huge numbers, nested junk). The
router answers 200 (the garbage is acceptable there) or a 4xx naming the field, never a
500, never a traceback in its log, and it goes on serving. Real router, sim worker."""
from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from conftest import Cluster


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


GARBAGE: list[Any] = [None, True, -1, 10 ** 40, 1e308, "", "x" * 5000, "\ud800", [], {},
                      [None], [[[]]], nested(400), {"a": [{"b": None}]}, [{"role": "user"}]]

TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
OLLAMA_TOOL = copy.deepcopy(TOOL)

ROUTES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/chat/completions", {
        "model": "sim", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1,
        "stop": ["zz"], "stream": False, "user": "u", "tool_choice": "auto",
        "response_format": {"type": "text"}, "tools": [TOOL],
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "c1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "user", "content": "thanks"}]}),
    ("POST", "/v1/completions", {"model": "sim", "prompt": "hi", "max_tokens": 2,
                                 "temperature": 0.5, "stop": "zz", "seed": 1}),
    ("POST", "/v1/embeddings", {"model": "sim", "input": ["an owl", "a cat"],
                                "encoding_format": "float"}),
    ("POST", "/api/chat", {
        "model": "sim", "stream": False, "keep_alive": "5m", "tools": [OLLAMA_TOOL],
        "options": {"temperature": 0.5, "num_predict": 2, "top_p": 0.9, "seed": 1,
                    "stop": ["zz"], "num_ctx": 2048},
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "weather?", "images": []},
            {"role": "assistant", "content": "", "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": "sunny"},
            {"role": "user", "content": "thanks"}]}),
    ("POST", "/api/generate", {"model": "sim", "prompt": "hi", "system": "Be brief.",
                               "stream": False, "options": {"num_predict": 2}}),
    ("POST", "/api/embed", {"model": "sim", "input": ["an owl"], "truncate": True}),
    ("POST", "/api/embeddings", {"model": "sim", "prompt": "an owl"}),
    ("POST", "/api/show", {"model": "sim"}),
    ("POST", "/v1/conversations", {"title": "notes"}),
    ("PATCH", "/v1/conversations/{id}", {"title": "renamed"}),
    ("POST", "/v1/conversations/{id}/messages", {"content": "hi", "max_tokens": 2,
                                                 "temperature": 0.5}),
]


def paths(value: Any, at: tuple = ()) -> Iterator[tuple]:
    """Every place in `value` a field can be replaced: the root, each key, each item."""
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*at, i))


def replaced(body: Any, at: tuple, garbage: Any) -> Any:
    if not at:
        return garbage
    out = copy.deepcopy(body)
    place = out
    for step in at[:-1]:
        place = place[step]
    place[at[-1]] = copy.deepcopy(garbage)
    return out


@pytest.mark.parametrize("method,route,body", ROUTES, ids=[f"{m} {r}" for m, r, _ in ROUTES])
async def test_every_field_replaced_by_garbage_is_a_400_naming_it_never_a_500(
        cluster: Cluster, tmp_path, method: str, route: str, body: dict[str, Any]):
    cluster.router("--db", str(tmp_path / "c.db"))
    cluster.worker("w1", "--sim-reply-tokens", "2")
    base = (await cluster.wait_workers(1))["router"]["http"]
    tried: dict[int, int] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        async with http.post(base + "/v1/conversations", json={"title": "t"}) as r:
            assert r.status == 201, await r.text()
            path = route.replace("{id}", (await r.json())["id"])
        async with http.request(method, base + path, json=body) as r:
            assert r.status in (200, 201), (route, await r.text())  # the valid request
        for at in paths(body):
            for garbage in GARBAGE:
                sent = replaced(body, at, garbage)
                async with http.request(method, base + path, json=sent) as r:
                    text = await r.text()
                    tried[r.status] = tried.get(r.status, 0) + 1
                    assert r.status in (200, 201, 400, 404, 413), (at, garbage, r.status, text)
                    if r.status == 400 and at:
                        # The error names the field (its top-level key, or the route's
                        # word for the body as a whole).
                        assert str(at[0]) in text, (at, garbage, text)
                    assert "Traceback" not in text
        async with http.request(method, base + path, json=body) as r:
            assert r.status in (200, 201), await r.text()  # still serving
    log = cluster.logs()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert tried.get(400, 0) > 0, tried  # the garbage did reach the parsers
