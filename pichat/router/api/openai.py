"""The OpenAI API's request and response shapes, translated to and from pichat's protocol.

Pure functions: JSON bodies in, `Request`s out; pichat messages in, OpenAI objects out.
What the HTTP layer (pichat/router/api/app.py) does with them is I/O. Only what pichat can
honour is accepted: one choice (`n` = 1), text content; unknown fields are ignored, as
OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import array
import base64
import math
import time
from dataclasses import dataclass
from typing import Any

from pichat.errors import ErrorCode
from pichat.protocol import (
    MAX_EMBED_CHARS,
    MAX_EMBED_INPUTS,
    MAX_ID_CHARS,
    MAX_MESSAGES,
    MAX_NAME_CHARS,
    MAX_STOP_CHARS,
    MAX_TOKENS_LIMIT,
    ChatMessage,
    Done,
    Request,
    RequestId,
    Sampling,
    SessionId,
)
from pichat.router.api import tools

__all__ = [
    "ApiError",
    "ChatCall",
    "text",
    "parse_chat",
    "parse_completion",
    "error_body",
    "status_for",
    "completion_object",
    "chunk_object",
    "usage_object",
    "model_list",
]

ANY_MODEL = frozenset(("", "pichat", "default"))
"""Model names that mean "whatever the cluster serves"."""

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
          "tool": "tool"}


@dataclass(frozen=True, slots=True)
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    retry_after: int | None = None


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A parsed call: the pichat request, and how the answer must be shaped."""

    request: Request
    model: str
    stream: bool
    include_usage: bool
    kind: str
    """"chat" (/v1/chat/completions) or "text" (/v1/completions)."""
    calls: frozenset[str] | None = None
    """The functions the answer may call (pichat/router/api/tools.py); None: no calls."""


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, key: str, lo: float, hi: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and lo <= value <= hi
    ):
        raise _bad(f"'{key}' must be a number from {lo} to {hi}", key)
    return float(value)


def _integer(body: dict, key: str, lo: int, hi: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _bad(f"'{key}' must be an integer from {lo} to {hi}", key)
    return value


def text(value: Any, param: str, max_chars: int | None = None) -> str:
    """`value` if it is a string that can go on the wire (UTF-8: no lone surrogates, which
    JSON's \\ud800 escapes can make) of at most `max_chars` characters."""
    if not isinstance(value, str):
        raise _bad(f"'{param}' must be a string", param)
    if max_chars is not None and len(value) > max_chars:
        raise _bad(f"'{param}' is longer than {max_chars} characters", param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _bad(f"'{param}' is not valid Unicode (a lone surrogate at {exc.start})",
                   param) from None
    return value


def _content(value: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if isinstance(value, str):
        return text(value, param)
    if value is None:
        return ""
    if isinstance(value, list):
        parts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str
            ):
                raise _bad(f"{param}: only text parts are supported", param)
            parts.append(text(part["text"], param))
        return "".join(parts)
    raise _bad(f"{param} must be a string or a list of text parts", param)


def _messages(body: dict) -> tuple[ChatMessage, ...]:
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise _bad("'messages' must be a non-empty list", "messages")
    if len(raw) > MAX_MESSAGES:
        raise _bad(f"at most {MAX_MESSAGES} messages", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        role = _ROLES.get(role) if isinstance(role, str) else None
        if role is None:
            raise _bad(f"messages[{i}].role must be one of {sorted(_ROLES)}", f"messages[{i}].role")
        calls = tools.calls_of(m.get("tool_calls"), i) if role == "assistant" else ""
        answers = m.get("tool_call_id", "") if role == "tool" else ""
        if not isinstance(answers, str) or len(answers) > MAX_ID_CHARS:
            raise _bad(f"messages[{i}].tool_call_id must be a string of at most "
                       f"{MAX_ID_CHARS} characters", f"messages[{i}].tool_call_id")
        out.append(ChatMessage(role, _content(m.get("content"), i),  # type: ignore[arg-type]
                               calls, answers))
    tools.check_tool_messages([(m.role, m.tool_calls, m.tool_call_id) for m in out])
    return tuple(out)


def _common(body: Any, session: str | None, default_max_tokens: int
            ) -> tuple[dict, Sampling, str, bool, bool, str | None]:
    """What chat and plain completions share: model, stream, sampling, session."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = text(body.get("model", ""), "model", MAX_NAME_CHARS)
    if (n := _integer(body, "n", 1, 1_000_000)) not in (None, 1):
        raise _bad(f"only n=1 is supported (got {n})", "n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be a boolean", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise _bad("'stream_options' must be an object with a boolean include_usage",
                   "stream_options")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (text(stop, "stop", MAX_STOP_CHARS),) if stop else ()
    elif isinstance(stop, list) and len(stop) <= 4 and all(
        isinstance(s, str) and 0 < len(s) for s in stop
    ):
        stops = tuple(text(s, "stop", MAX_STOP_CHARS) for s in stop)
    else:
        raise _bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    max_tokens = _integer(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    defaults = Sampling()
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _integer(body, "seed", -(2**63), 2**63 - 1)
    sampling = Sampling(
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=None if seed is None else seed % 2**32,  # llama.cpp seeds are 32-bit
        max_tokens=max_tokens or default_max_tokens,
        stop=stops,
    )
    user = body.get("user")
    if user is not None:
        user = text(user, "user", 128)
    include_usage = bool(options.get("include_usage"))
    return body, sampling, model, stream, include_usage, session or user or None


def parse_chat(body: Any, request_id: str, *, session: str | None = None,
               default_max_tokens: int = 512) -> ChatCall:
    """A /v1/chat/completions body. `session`: the X-Session-Id header, which wins over
    the body's `user`."""
    body, sampling, model, stream, include_usage, session = _common(
        body, session, default_max_tokens)
    truncate = body.get("truncate", True)
    if not isinstance(truncate, bool):
        raise _bad("'truncate' must be a boolean (false: a conversation too long for the "
                   "context is an error instead of dropping its oldest turns)", "truncate")
    try:
        functions, names = tools.tools_of(body)
        request = Request(
            id=RequestId(request_id),
            messages=_messages(body),
            sampling=sampling,
            session=SessionId(session[:128]) if session else None,
            model=None if model in ANY_MODEL else model,
            truncate=truncate,
            # tool_choice none: the tools are not shown at all (a small model shown tools
            # tends to call one whatever it is told).
            tools=functions if body.get("tool_choice") != "none" else "",
            tool_choice=tools.choice_of(body, names),
            format=tools.format_of(body),
        )
    except tools.ToolError as exc:
        raise _bad(str(exc), exc.param) from None
    return ChatCall(request, model or "pichat", stream, include_usage, "chat",
                    calls=frozenset(names) if request.tools else None)


def parse_completion(body: Any, request_id: str, *, session: str | None = None,
                     default_max_tokens: int = 512) -> ChatCall:
    """A /v1/completions body (a plain prompt, continued without the chat template)."""
    body, sampling, model, stream, include_usage, session = _common(
        body, session, default_max_tokens)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise _bad("'prompt' must be a non-empty string (or a list of one)", "prompt")
    text(prompt, "prompt")
    request = Request(
        id=RequestId(request_id),
        messages=(),
        prompt=prompt,
        sampling=sampling,
        session=SessionId(session[:128]) if session else None,
        model=None if model in ANY_MODEL else model,
    )
    return ChatCall(request, model or "pichat", stream, include_usage, "text")


@dataclass(frozen=True, slots=True)
class EmbedCall:
    request: Request
    model: str
    base64: bool


def parse_embeddings(body: Any, request_id: str) -> EmbedCall:
    """A /v1/embeddings body: `input` a string or a list of strings."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = text(body.get("model", ""), "model", MAX_NAME_CHARS)
    raw = body.get("input")
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
        raise _bad("'input' must be a string or a non-empty list of strings (token arrays are "
                   "not supported)", "input")
    if len(inputs) > MAX_EMBED_INPUTS:
        raise _bad(f"at most {MAX_EMBED_INPUTS} inputs per request", "input")
    for i, x in enumerate(inputs):
        text(x, f"input[{i}]", MAX_EMBED_CHARS)
        if not x:
            raise _bad(f"input[{i}] is empty", "input")
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _bad("'encoding_format' must be float or base64", "encoding_format")
    if body.get("dimensions") is not None:
        raise _bad("'dimensions' is not supported: each model has its own", "dimensions")
    request = Request(id=RequestId(request_id), messages=(), embed=tuple(inputs),
                      model=None if model in ANY_MODEL else model)
    return EmbedCall(request, model or "pichat", encoding == "base64")


def embeddings_object(call: EmbedCall, done: Done) -> dict[str, Any]:
    data = []
    for i, vector in enumerate(done.embeddings):
        if call.base64:
            value: Any = base64.b64encode(vector).decode()
        else:
            value = [float(x) for x in array.array("f", vector)]
        data.append({"object": "embedding", "index": i, "embedding": value})
    tokens = done.usage.prompt_tokens
    return {"object": "list", "data": data, "model": call.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- responses ----------------------------------------------------------------------

_STATUS: dict[ErrorCode, tuple[int, str, int | None]] = {
    ErrorCode.PROTOCOL: (400, "invalid_request_error", None),
    ErrorCode.VERSION: (400, "invalid_request_error", None),
    ErrorCode.BAD_REQUEST: (400, "invalid_request_error", None),
    ErrorCode.CONTEXT_LENGTH: (400, "invalid_request_error", None),
    ErrorCode.BUSY: (429, "rate_limit_error", 2),
    ErrorCode.NO_WORKERS: (503, "service_unavailable", 5),
    ErrorCode.TIMEOUT: (504, "timeout", None),
    ErrorCode.WORKER_LOST: (502, "server_error", 1),
    ErrorCode.CANCELLED: (499, "cancelled", None),
    ErrorCode.INTERNAL: (500, "server_error", None),
}


def status_for(code: ErrorCode, message: str) -> ApiError:
    status, kind, retry = _STATUS[code]
    wire = "context_length_exceeded" if code is ErrorCode.CONTEXT_LENGTH else code.value
    return ApiError(status, message, kind, wire, retry_after=retry)


def error_body(error: ApiError) -> dict[str, Any]:
    return {"error": {"message": error.message, "type": error.type, "param": error.param,
                      "code": error.code}}


def usage_object(done: Done) -> dict[str, Any]:
    u = done.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def _pichat(done: Done) -> dict[str, Any]:
    """pichat's own fields (OpenAI clients ignore unknown ones)."""
    u = done.usage
    out = {"worker": done.worker, "prompt_tokens": u.prompt_tokens,
           "cached_tokens": u.cached_tokens, "prompt_ms": u.prompt_ms,
           "generate_ms": u.generate_ms,
           "tokens_per_s": round(u.tokens_per_s, 2), "finish": done.finish,
           "failovers": done.failovers}
    if done.conversation:
        out["conversation"] = done.conversation
    if u.dropped_tokens:
        out["dropped_tokens"] = u.dropped_tokens
    if done.tools_left_out:
        out["tools_left_out"] = list(done.tools_left_out)
    return out


def _finish(done: Done, calls: bool = False) -> str:
    if calls:
        return "tool_calls"
    return "length" if done.finish == "length" else "stop"


def completion_object(call: ChatCall, text: str, done: Done, created: int) -> dict[str, Any]:
    """The whole answer (stream = false)."""
    if call.kind == "chat":
        found: list[tools.Call] = []
        if call.calls is not None:
            text, found = tools.extract(text, call.calls)
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if found:
            message["tool_calls"] = [c.openai() for c in found]
        elif message["content"] is None:
            message["content"] = ""
        choice: dict[str, Any] = {"index": 0, "message": message,
                                  "finish_reason": _finish(done, bool(found)), "logprobs": None}
        kind = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": _finish(done), "logprobs": None}
        kind = "text_completion"
    return {"id": _id(call), "object": kind, "created": created, "model": call.model,
            "choices": [choice], "usage": usage_object(done), "pichat": _pichat(done)}


def chunk_object(call: ChatCall, created: int, *, text: str | None = None, first: bool = False,
                 done: Done | None = None, usage_only: bool = False,
                 calls: list[tools.Call] | None = None, called: bool = False
                 ) -> dict[str, Any]:
    """One server-sent event of a stream."""
    kind = "chat.completion.chunk" if call.kind == "chat" else "text_completion"
    out: dict[str, Any] = {"id": _id(call), "object": kind, "created": created,
                           "model": call.model}
    if usage_only:
        assert done is not None
        out["choices"] = []
        out["usage"] = usage_object(done)
        return out
    if call.kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if calls:
            delta["tool_calls"] = [c.openai(i) for i, c in enumerate(calls)]
        choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None,
                                  "finish_reason": None}
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": None}
    if done is not None:
        choice["finish_reason"] = _finish(done, called)
        out["pichat"] = _pichat(done)
    out["choices"] = [choice]
    return out


def _id(call: ChatCall) -> str:
    prefix = "chatcmpl-" if call.kind == "chat" else "cmpl-"
    return prefix + call.request.id


def model_list(models: dict[str, float]) -> dict[str, Any]:
    """GET /v1/models: `models` maps each served model to when its first worker joined."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": int(joined), "owned_by": "pichat"}
        for name, joined in sorted(models.items())
    ]}


def now() -> int:
    return int(time.time())
