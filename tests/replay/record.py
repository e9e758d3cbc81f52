"""A recording stand-in for an OpenAI- and Ollama-compatible server.

It answers just well enough that real client programs (the openai and ollama packages,
LangChain, the llm CLI, Home Assistant's Ollama integration, Open WebUI) go on with
what they do, and appends every request it gets to a JSONL file:

    {"ts", "method", "path", "query", "headers", "body", "body_bytes"}

Only Content-Type, User-Agent and Accept are kept of the headers, plus the names of auth
headers, whose values become "<redacted>". The body is the parsed JSON where it is JSON,
else the text. Any path it does not emulate answers 404 and is recorded all the same.

    python tests/replay/record.py --log requests.jsonl --ready-file port.txt

binds 127.0.0.1 on a free port (port 0), prints it and writes it to --ready-file.

With tools in a chat request whose last message is the user's, it answers a tool call
when one tool's name matches the user's words ("What's the weather in Paris?" ->
get_weather, "Turn on the kitchen light" -> HassTurnOn), so a client's second turn (the
tool result) can be captured too; otherwise a short canned text. Task prompts of Open
WebUI (title, tags, follow-ups, queries) get the small JSON they ask for.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import random
import re
import struct
import sys
import time
import uuid
from pathlib import Path

from aiohttp import web

MODEL = "pichat"
OLLAMA_MODEL = "pichat:latest"
EMBED_DIM = 64
CANNED = "Hello! I am doing well, thank you for asking."
KEEP_HEADERS = ("content-type", "user-agent", "accept")
AUTH_HEADERS = ("authorization", "proxy-authorization", "x-api-key", "api-key", "cookie")
OLLAMA_VERSION = "0.13.5"
DIGEST = "sha256:" + "5f" * 32
DETAILS = {
    "parent_model": "",
    "format": "gguf",
    "family": "qwen2",
    "families": ["qwen2"],
    "parameter_size": "494.03M",
    "quantization_level": "Q4_K_M",
}
GENERIC_WORDS = {"get", "hass", "set", "the", "a", "of", "to", "tool", "current"}


def keep_headers(headers) -> dict:
    out = {}
    for name, value in headers.items():
        low = name.lower()
        if low in KEEP_HEADERS:
            out[name] = value
        elif low in AUTH_HEADERS:
            out[name] = "<redacted>"
    return out


# --- answers ---------------------------------------------------------------------------


def fake_from_schema(schema, depth: int = 0):
    """A small instance of a JSON schema (enough for a client that parses the answer)."""
    if not isinstance(schema, dict) or depth > 6:
        return "ok"
    if "enum" in schema and schema["enum"]:
        return schema["enum"][0]
    if "const" in schema:
        return schema["const"]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return fake_from_schema(schema[key][0], depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: fake_from_schema(v, depth + 1) for k, v in props.items()}
    if kind == "array":
        return [fake_from_schema(schema.get("items", {}), depth + 1)]
    if kind == "integer":
        return 4
    if kind == "number":
        return 21.5
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "Paris"


def text_of(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def task_answer(messages: list) -> str | None:
    """Open WebUI's background tasks ask for JSON; give them the shape they parse."""
    text = " ".join(text_of(m.get("content")) for m in messages if isinstance(m, dict))
    if "### Task:" not in text:
        return None
    for key, answer in (
            ("follow_ups", {"follow_ups": ["What else can you do?", "Tell me a fact."]}),
            ("tags", {"tags": ["General", "Greetings"]}),
            ("queries", {"queries": ["hello"]}),
            ("title", {"title": "Friendly greeting"}),
            ("text", {"text": "ok"})):
        if f'"{key}"' in text:
            return json.dumps(answer)
    return None


def words(name: str) -> list[str]:
    parts = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name).replace("_", " ").lower().split()
    return [p for p in parts if p not in GENERIC_WORDS]


def tool_name(tool: dict) -> str:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return fn.get("name", "")


def tool_params(tool: dict) -> dict:
    fn = tool.get("function", tool) if isinstance(tool, dict) else {}
    return fn.get("parameters") or {}


def pick_tool(tools: list, messages: list) -> tuple[str, dict] | None:
    """A tool whose every name word is in the user's last message, with plausible args."""
    if not tools or not messages or not isinstance(messages[-1], dict):
        return None
    if messages[-1].get("role") != "user":
        return None
    said = text_of(messages[-1].get("content"))
    said_words = set(re.findall(r"[a-z0-9]+", said.lower()))
    best = None
    for tool in tools:
        ws = words(tool_name(tool))
        if ws and all(w in said_words for w in ws):
            if best is None or len(ws) > len(words(tool_name(best))):
                best = tool
    if best is None:
        return None
    return tool_name(best), tool_args(tool_params(best), said)


def tool_args(params: dict, said: str) -> dict:
    said = said.strip().rstrip("?.!")
    starts = [m.end() for m in re.finditer(r"\b(?:in|the|for)\s+", said, re.I)]
    phrase = said[starts[-1]:] if starts else said[:40]
    props = params.get("properties", {}) if isinstance(params, dict) else {}
    required = params.get("required") or list(props)[:1]
    args = {}
    for key in required:
        schema = props.get(key, {})
        kind = schema.get("type", "string")
        if "enum" in schema:
            args[key] = schema["enum"][0]
        elif kind in ("integer", "number"):
            args[key] = 50
        elif kind == "boolean":
            args[key] = True
        elif kind == "array":
            args[key] = [phrase]
        else:
            args[key] = phrase
    return args


def reply_for(body: dict) -> dict:
    """What to answer: {"text": str} or {"tool": (name, args)}."""
    messages = body.get("messages") or []
    task = task_answer(messages)
    if task is not None:
        return {"text": task}
    picked = pick_tool(body.get("tools") or [], messages)
    if picked:
        return {"tool": picked}
    fmt = body.get("response_format") or {}
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema", {})
        return {"text": json.dumps(fake_from_schema(schema))}
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        return {"text": json.dumps({"answer": CANNED})}
    ofmt = body.get("format")
    if ofmt == "json":
        return {"text": json.dumps({"answer": CANNED})}
    if isinstance(ofmt, dict):
        return {"text": json.dumps(fake_from_schema(ofmt))}
    return {"text": CANNED}


def chunks_of(text: str) -> list[str]:
    parts = re.findall(r"\S+\s*", text)
    return parts or [text]


def unit_vector(seed: str) -> list[float]:
    rng = random.Random(seed)
    v = [rng.gauss(0, 1) for _ in range(EMBED_DIM)]
    n = sum(x * x for x in v) ** 0.5
    return [x / n for x in v]


def now_iso() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


def usage(body: dict, text: str) -> dict:
    p = len(json.dumps(body.get("messages", ""))) // 4
    c = max(1, len(text) // 4)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


# --- OpenAI ----------------------------------------------------------------------------


async def openai_models(request, body):
    return web.json_response({"object": "list", "data": [
        {"id": MODEL, "object": "model", "created": 1764806400, "owned_by": "pichat"}]})


async def openai_chat(request, body):
    if not isinstance(body, dict):
        return web.json_response({"error": {"message": "bad JSON"}}, status=400)
    r = reply_for(body)
    cid = "chatcmpl-" + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = body.get("model", MODEL)
    calls = None
    if "tool" in r:
        name, args = r["tool"]
        calls = [{"id": "call_" + uuid.uuid4().hex[:12], "type": "function",
                  "function": {"name": name, "arguments": json.dumps(args)}}]
    text = r.get("text", "")
    if not body.get("stream"):
        msg = {"role": "assistant", "content": None if calls else text}
        if calls:
            msg["tool_calls"] = calls
        return web.json_response({
            "id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": msg,
                         "finish_reason": "tool_calls" if calls else "stop"}],
            "usage": usage(body, text)})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(delta, finish=None, **extra):
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [{"index": 0, "delta": delta,
                                              "finish_reason": finish}]}
        chunk.update(extra)
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    await send({"role": "assistant", "content": ""})
    if calls:
        c = calls[0]
        await send({"tool_calls": [{"index": 0, "id": c["id"], "type": "function",
                                    "function": {"name": c["function"]["name"],
                                                 "arguments": ""}}]})
        await send({"tool_calls": [{"index": 0, "function": {
            "arguments": c["function"]["arguments"]}}]})
        await send({}, "tool_calls")
    else:
        for part in chunks_of(text):
            await send({"content": part})
            await asyncio.sleep(0.005)
        await send({}, "stop")
    if (body.get("stream_options") or {}).get("include_usage"):
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": created,
                 "model": model, "choices": [], "usage": usage(body, text)}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def openai_completions(request, body):
    body = body if isinstance(body, dict) else {}
    return web.json_response({
        "id": "cmpl-" + uuid.uuid4().hex[:24], "object": "text_completion",
        "created": int(time.time()), "model": body.get("model", MODEL),
        "choices": [{"index": 0, "text": CANNED, "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 10, "total_tokens": 15}})


async def openai_embeddings(request, body):
    body = body if isinstance(body, dict) else {}
    inp = body.get("input", "")
    items = inp if isinstance(inp, list) and inp and not isinstance(inp[0], int) else [inp]
    b64 = body.get("encoding_format") == "base64"
    data = []
    for i, item in enumerate(items):
        v = unit_vector(json.dumps(item))
        emb = base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode() if b64 else v
        data.append({"object": "embedding", "index": i, "embedding": emb})
    return web.json_response({"object": "list", "data": data, "model": body.get("model", MODEL),
                              "usage": {"prompt_tokens": 8, "total_tokens": 8}})


# --- Ollama ----------------------------------------------------------------------------


def ollama_model_entry(ps: bool = False) -> dict:
    e = {"name": OLLAMA_MODEL, "model": OLLAMA_MODEL, "modified_at": "2026-12-01T10:00:00Z",
         "size": 397821319, "digest": DIGEST, "details": DETAILS}
    if ps:
        e.pop("modified_at")
        e.update({"expires_at": "2026-12-04T12:00:00Z", "size_vram": 0,
                  "context_length": 4096})
    return e


async def ollama_version(request, body):
    return web.json_response({"version": OLLAMA_VERSION})


async def ollama_tags(request, body):
    return web.json_response({"models": [ollama_model_entry()]})


async def ollama_ps(request, body):
    return web.json_response({"models": [ollama_model_entry(ps=True)]})


async def ollama_show(request, body):
    return web.json_response({
        "license": "Apache License 2.0",
        "modelfile": f"# Modelfile generated by \"ollama show\"\nFROM {OLLAMA_MODEL}\n",
        "parameters": "stop \"<|im_start|>\"\nstop \"<|im_end|>\"",
        "template": "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}"
                    "<|im_end|>\n{{ end }}<|im_start|>assistant\n",
        "details": DETAILS,
        "model_info": {"general.architecture": "qwen2", "general.parameter_count": 494032768,
                       "qwen2.context_length": 32768, "qwen2.embedding_length": 896},
        "capabilities": ["completion", "tools"],
        "modified_at": "2026-12-01T10:00:00Z"})


def ollama_final(model: str, extra: dict) -> dict:
    out = {"model": model, "created_at": now_iso()}
    out.update(extra)
    out.update({"done": True, "done_reason": "stop", "total_duration": 123456789,
                "load_duration": 1234567, "prompt_eval_count": 26,
                "prompt_eval_duration": 23456789, "eval_count": 12,
                "eval_duration": 98765432})
    return out


async def ndjson(request, lines: list[dict]):
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)
    for line in lines:
        await resp.write(json.dumps(line).encode() + b"\n")
        await asyncio.sleep(0.005)
    await resp.write_eof()
    return resp


async def ollama_chat(request, body):
    if not isinstance(body, dict):
        return web.json_response({"error": "bad JSON"}, status=400)
    model = body.get("model", OLLAMA_MODEL)
    r = reply_for(body)
    calls = None
    if "tool" in r:
        name, args = r["tool"]
        calls = [{"function": {"name": name, "arguments": args}}]
    text = r.get("text", "")
    if body.get("stream", True) is False:
        msg = {"role": "assistant", "content": text}
        if calls:
            msg["tool_calls"] = calls
        return web.json_response(ollama_final(model, {"message": msg}))
    lines = []
    if calls:
        lines.append({"model": model, "created_at": now_iso(), "message": {
            "role": "assistant", "content": "", "tool_calls": calls}, "done": False})
    else:
        for part in chunks_of(text):
            lines.append({"model": model, "created_at": now_iso(),
                          "message": {"role": "assistant", "content": part}, "done": False})
    lines.append(ollama_final(model, {"message": {"role": "assistant", "content": ""}}))
    return await ndjson(request, lines)


async def ollama_generate(request, body):
    body = body if isinstance(body, dict) else {}
    model = body.get("model", OLLAMA_MODEL)
    if not body.get("prompt"):  # a load/unload request
        return web.json_response(ollama_final(model, {"response": ""}))
    r = reply_for({"messages": [{"role": "user", "content": body.get("prompt", "")}],
                   "format": body.get("format")})
    text = r.get("text", CANNED)
    if body.get("stream", True) is False:
        return web.json_response(ollama_final(model, {"response": text, "context": [1, 2, 3]}))
    lines = [{"model": model, "created_at": now_iso(), "response": p, "done": False}
             for p in chunks_of(text)]
    lines.append(ollama_final(model, {"response": "", "context": [1, 2, 3]}))
    return await ndjson(request, lines)


async def ollama_embed(request, body):
    body = body if isinstance(body, dict) else {}
    inp = body.get("input", "")
    items = inp if isinstance(inp, list) else [inp]
    return web.json_response({"model": body.get("model", OLLAMA_MODEL),
                              "embeddings": [unit_vector(json.dumps(i)) for i in items],
                              "total_duration": 1234567, "load_duration": 1234,
                              "prompt_eval_count": 8})


async def ollama_embeddings(request, body):
    body = body if isinstance(body, dict) else {}
    return web.json_response({"embedding": unit_vector(json.dumps(body.get("prompt", "")))})


async def root(request, body):
    return web.Response(text="Ollama is running")


ROUTES = {
    ("GET", "/"): root,
    ("HEAD", "/"): root,
    ("GET", "/v1/models"): openai_models,
    ("POST", "/v1/chat/completions"): openai_chat,
    ("POST", "/v1/completions"): openai_completions,
    ("POST", "/v1/embeddings"): openai_embeddings,
    ("GET", "/api/version"): ollama_version,
    ("GET", "/api/tags"): ollama_tags,
    ("GET", "/api/ps"): ollama_ps,
    ("POST", "/api/show"): ollama_show,
    ("POST", "/api/chat"): ollama_chat,
    ("POST", "/api/generate"): ollama_generate,
    ("POST", "/api/embed"): ollama_embed,
    ("POST", "/api/embeddings"): ollama_embeddings,
}


def make_app(log_path: Path) -> web.Application:
    log = open(log_path, "a", encoding="utf-8")  # noqa: SIM115 (lives as long as the app)

    async def handle(request: web.Request):
        raw = await request.read()
        try:
            body = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            body = raw.decode("utf-8", "replace")
        path = request.path
        if path != "/" and path.endswith("/"):
            path = path.rstrip("/")
        entry = {"ts": round(time.time(), 3), "method": request.method, "path": path,
                 "query": request.query_string, "headers": keep_headers(request.headers),
                 "body": body, "body_bytes": len(raw)}
        if path in ("/v1/chat/completions", "/api/chat") and isinstance(body, dict):
            r = reply_for(body)
            entry["reply"] = f"tool_call {r['tool'][0]}" if "tool" in r else "text"
        log.write(json.dumps(entry) + "\n")
        log.flush()
        handler = ROUTES.get((request.method, path))
        if handler is None:
            return web.json_response({"error": f"not found: {request.method} {path}"},
                                     status=404)
        return await handler(request, body)

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    app.on_cleanup.append(lambda _app: asyncio.to_thread(log.close))
    return app


async def serve(log_path: Path, host: str, port: int, ready_file: Path | None) -> None:
    runner = web.AppRunner(make_app(log_path), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"recording on http://{host}:{bound} -> {log_path}", flush=True)
    if ready_file:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(str(bound))
        tmp.replace(ready_file)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--log", type=Path, required=True, help="JSONL file to append to")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--ready-file", type=Path)
    a = ap.parse_args(argv)
    try:
        asyncio.run(serve(a.log, a.host, a.port, a.ready_file))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
