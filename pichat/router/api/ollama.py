"""Ollama's API, translated to and from pichat's protocol (the routes: pichat/router/api/app.py).

Many apps speak Ollama rather than OpenAI (Open WebUI, Home Assistant's Ollama
integration, the `ollama` package). The same HTTP port answers `/api/chat`,
`/api/generate` (newline-delimited JSON when streamed, Ollama's default), `/api/embed`
(and the older `/api/embeddings`), `/api/tags`, `/api/show`, `/api/ps`, `/api/version`,
with Ollama's field names, `options` (temperature, num_predict, stop, seed, top_p,
top_k, min_p, repeat_penalty; num_ctx is the worker's), `format` ("json" or a schema) and
`tools`. Errors are `{"error": "..."}`. A cluster's models are what its workers load, so
`/api/pull`, `/api/push`, `/api/create`, `/api/copy` and `/api/delete` answer with an
error that says so. Pure functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pichat.protocol import (
    MAX_EMBED_CHARS,
    MAX_EMBED_INPUTS,
    MAX_MESSAGES,
    MAX_STOP_CHARS,
    MAX_TOKENS_LIMIT,
    ChatMessage,
    Done,
    Request,
    RequestId,
    Sampling,
)
from pichat.router.api import tools
from pichat.router.api.openai import ANY_MODEL, ApiError, text

__all__ = ["OllamaCall", "parse_chat", "parse_generate", "parse_embed", "line", "final",
           "embed_object", "tags", "show", "ps", "MANAGEMENT"]

MANAGEMENT = ("pull", "push", "create", "copy", "delete", "blobs")
"""Ollama routes that manage a machine's models: a cluster's models are what its workers
load (`pichat models` on each worker)."""

_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


@dataclass(frozen=True, slots=True)
class OllamaCall:
    request: Request
    model: str
    stream: bool
    kind: str
    """"chat" (/api/chat) or "generate" (/api/generate)."""
    calls: frozenset[str] | None = None


def _bad(message: str) -> ApiError:
    return ApiError(400, message)


def now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _sampling(body: dict[str, Any], default_max_tokens: int) -> Sampling:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise _bad("options must be an object")
    d = Sampling()

    def number(key: str, lo: float, hi: float, default: float) -> float:
        value = options.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not lo <= value <= hi:
            raise _bad(f"options.{key} must be a number from {lo} to {hi}")
        return value

    stop = options.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise _bad("options.stop must be up to 4 non-empty strings")
    predict = int(number("num_predict", -2, MAX_TOKENS_LIMIT, default_max_tokens))
    seed = options.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _bad("options.seed must be an integer")
    return Sampling(
        temperature=number("temperature", 0.0, 5.0, 0.8),  # Ollama's default
        top_p=number("top_p", 0.0, 1.0, 0.9),
        top_k=int(number("top_k", 0, 100_000, 40)),
        min_p=number("min_p", 0.0, 1.0, d.min_p),
        repeat_penalty=number("repeat_penalty", 0.1, 10.0, 1.1),
        seed=None if seed is None else seed % 2**32,
        max_tokens=default_max_tokens if predict <= 0 else predict,
        stop=tuple(stop))


def model_name(body: dict[str, Any]) -> str:
    """The body's model without Ollama's default tag: clients write `NAME:latest` for the
    `NAME` that /api/tags lists (and `pichat:latest` for any model)."""
    return untagged(text(body.get("model", ""), "model", 256))


def untagged(name: str) -> str:
    """`NAME:latest` is `NAME`, as in Ollama."""
    return name.removesuffix(":latest")


def _common(body: Any) -> tuple[dict[str, Any], str, bool, str]:
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = model_name(body)
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise _bad("stream must be a boolean")
    raw = body.get("format") or ""
    if raw == "json":
        fmt = "json"
    elif isinstance(raw, dict):
        try:
            fmt = tools.schema_text(raw, "format")
        except tools.ToolError as exc:
            raise _bad(str(exc)) from None
    elif raw == "":
        fmt = ""
    else:
        raise _bad('format must be "json" or a JSON schema object')
    return body, model, stream, fmt


def _messages(raw: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or len(raw) > MAX_MESSAGES:
        raise _bad(f"messages must be a list of at most {MAX_MESSAGES}")
    out = []
    for i, m in enumerate(raw):
        raw_role = m.get("role") if isinstance(m, dict) else None
        role = _ROLES.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            raise _bad(f"messages[{i}].role must be one of {sorted(_ROLES)}")
        if m.get("images"):
            raise _bad(f"messages[{i}]: images are not supported (text models only)")
        content = text(m.get("content") or "", f"messages[{i}].content")
        calls = ""
        if role == "assistant" and m.get("tool_calls"):
            raw_calls = m["tool_calls"]
            if not isinstance(raw_calls, list):
                raise _bad(f"messages[{i}].tool_calls must be a list")
            # Ollama's calls carry no ids: each gets one, as OpenAI's do.
            calls = tools.calls_of([{"id": f"call_{i}_{k}", "type": "function",
                                     "function": c.get("function") if isinstance(c, dict)
                                     else None} for k, c in enumerate(raw_calls)], i)
        out.append(ChatMessage(role, content, calls))  # type: ignore[arg-type]
    return tuple(out)


def parse_chat(body: Any, request_id: str, *, default_max_tokens: int = 512) -> OllamaCall:
    body, model, stream, fmt = _common(body)
    try:
        functions, names = tools.tools_of(body)
        messages = _messages(body.get("messages"))
    except tools.ToolError as exc:
        raise _bad(str(exc)) from None
    if not messages:
        raise _bad("messages must not be empty")
    request = Request(
        id=RequestId(request_id), messages=messages,
        sampling=_sampling(body, default_max_tokens),
        model=None if model in ANY_MODEL else model, tools=functions, format=fmt)
    return OllamaCall(request, model or "pichat", stream, "chat",
                      frozenset(names) if functions else None)


def parse_generate(body: Any, request_id: str, *, default_max_tokens: int = 512
                   ) -> OllamaCall:
    body, model, stream, fmt = _common(body)
    prompt = text(body.get("prompt") or "", "prompt")
    system = text(body.get("system") or "", "system")
    if not prompt:
        raise _bad("prompt must be a non-empty string")
    sampling = _sampling(body, default_max_tokens)
    model_or_none = None if model in ANY_MODEL else model
    if body.get("raw"):  # no template: the text continued as it is
        request = Request(id=RequestId(request_id), messages=(), prompt=prompt,
                          sampling=sampling, model=model_or_none)
    else:
        messages = ((ChatMessage("system", system),) if system else ()) + (
            ChatMessage("user", prompt),)
        request = Request(id=RequestId(request_id), messages=messages, sampling=sampling,
                          model=model_or_none, format=fmt)
    return OllamaCall(request, model or "pichat", stream, "generate")


def parse_embed(body: Any, request_id: str, *, legacy: bool = False) -> tuple[Request, str]:
    """/api/embed (`input`: a string or strings) or /api/embeddings (`prompt`)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = model_name(body)
    field = "prompt" if legacy else "input"
    raw = body.get(field)
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(
            isinstance(x, str) and x for x in inputs):
        raise _bad(f"{field} must be a non-empty string" + (
            "" if legacy else " or list of non-empty strings"))
    if len(inputs) > MAX_EMBED_INPUTS or any(len(x) > MAX_EMBED_CHARS for x in inputs):
        raise _bad(f"at most {MAX_EMBED_INPUTS} inputs of {MAX_EMBED_CHARS} characters")
    return Request(id=RequestId(request_id), messages=(), embed=tuple(inputs),
                   model=None if model in ANY_MODEL else model), model or "pichat"


# --- answers --------------------------------------------------------------------------

def line(call: OllamaCall, text_part: str, calls: list[tools.Call] | None = None
         ) -> dict[str, Any]:
    """One streamed piece (done: false)."""
    out: dict[str, Any] = {"model": call.model, "created_at": now(), "done": False}
    if call.kind == "chat":
        message: dict[str, Any] = {"role": "assistant", "content": text_part}
        if calls:
            message["tool_calls"] = [{"function": {"name": c.name,
                                                   "arguments": json.loads(c.arguments)}}
                                     for c in calls]
        out["message"] = message
    else:
        out["response"] = text_part
    return out


def final(call: OllamaCall, done: Done, text_part: str = "",
          calls: list[tools.Call] | None = None) -> dict[str, Any]:
    """The last object (done: true), with the whole answer when not streamed."""
    out = line(call, text_part, calls)
    u = done.usage
    out.update({
        "done": True,
        "done_reason": "length" if done.finish == "length" else "stop",
        "total_duration": int((u.prompt_ms + u.generate_ms) * 1e6),
        "load_duration": 0,
        "prompt_eval_count": u.prompt_tokens - u.cached_tokens,
        "prompt_eval_duration": int(u.prompt_ms * 1e6),
        "eval_count": u.completion_tokens,
        "eval_duration": int(u.generate_ms * 1e6),
    })
    return out


def embed_object(model: str, done: Done, legacy: bool = False) -> dict[str, Any]:
    import array

    vectors = [[float(x) for x in array.array("f", v)] for v in done.embeddings]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    return {"model": model, "embeddings": vectors,
            "total_duration": int(done.usage.prompt_ms * 1e6), "load_duration": 0,
            "prompt_eval_count": done.usage.prompt_tokens}


def _details(ready: Any) -> dict[str, Any]:
    """What Ollama's listings say of a model, from its GGUF (as the worker read it)."""
    family = ready.family or ready.backend
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": ready.parameter_size, "quantization_level": ready.quantization}


def tags(workers: list[Any]) -> dict[str, Any]:
    """/api/tags: each model the live workers serve, once (`workers`: their READYs and
    when they joined)."""
    seen: dict[str, dict[str, Any]] = {}
    for ready, joined in workers:
        if ready.model in seen:
            continue
        stamp = datetime.fromtimestamp(joined, UTC).isoformat()
        seen[ready.model] = {"name": ready.model, "model": ready.model, "modified_at": stamp,
                             "size": ready.weights_bytes, "digest": _digest(ready.model),
                             "details": _details(ready)}
    return {"models": sorted(seen.values(), key=lambda m: m["name"])}


def show(model: str, workers: list[Any]) -> dict[str, Any] | None:
    model = untagged(model)
    for ready, joined in workers:
        if ready.model == model or model in ANY_MODEL:
            capabilities = ["embedding"] if ready.embedding_only else [
                "completion", "tools", "embedding"]
            return {"modelfile": f"# served by pichat worker {ready.worker}\n",
                    "parameters": f"num_ctx {ready.ctx}", "template": "",
                    "details": _details(ready),
                    "model_info": {"general.architecture": ready.family or ready.backend,
                                   "pichat.workers": sum(r.model == ready.model
                                                         for r, _ in workers),
                                   "pichat.context_length": ready.ctx},
                    "capabilities": capabilities,
                    "modified_at": datetime.fromtimestamp(joined, UTC).isoformat()}
    return None


def ps(workers: list[Any]) -> dict[str, Any]:
    out = []
    for ready, _ in workers:
        # in RAM: the weights and the KV cache the worker reserves (no GPU: no VRAM)
        size = ready.weights_bytes + ready.kv_cells * ready.kv_token_bytes
        out.append({"name": ready.model, "model": ready.model, "size": size,
                    "digest": _digest(ready.model), "details": _details(ready),
                    "expires_at": "0001-01-01T00:00:00Z", "size_vram": 0,
                    "pichat_worker": ready.worker})
    return {"models": out}


def _digest(model: str) -> str:
    import hashlib

    return hashlib.sha256(model.encode()).hexdigest()

