"""Tool calls and structured output at the router's HTTP face: a client's tools, tool
choice, tool messages and response format checked and put into pichat's request, and the
calls read back out of the model's answer.

The worker gives the tools to the model's chat template and constrains the answer with a
grammar where asked (pichat/worker/engine/tools.py); the model writes its calls as text, in its
family's syntax. They are read here, whatever the family:

- `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Hermes, Qwen), any number,
  anywhere in the answer (text around them is the message's content);
- a JSON object `{"name": ..., "parameters": {...}}` (Llama 3.x; `arguments` too), maybe
  after `<|python_tag|>`, several separated by `;`, as the whole answer; small models also
  wrap it in a Markdown code block or in one tag of their own (`<response>...</response>`).

Streamed, text goes out as it comes until it could be the start of a call; from there it
is held to the end, when it becomes calls, or, if it does not parse as calls, text after
all (`Spotter`). An unparseable call is never an error. Pure: no I/O.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from pichat.protocol import MAX_ID_CHARS, MAX_TOOL_NAME_CHARS, MAX_TOOLS, MAX_TOOLS_CHARS
from pichat.schemas import SchemaError, check_schema

__all__ = ["ToolError", "Call", "tools_of", "choice_of", "format_of", "schema_text", "calls_of",
           "check_tool_messages", "extract", "Spotter", "MAX_TOOLS"]

_NAME = re.compile(rf"^[A-Za-z0-9_.-]{{1,{MAX_TOOL_NAME_CHARS}}}$")
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_MARKERS = ("<tool_call>", "<|python_tag|>")
_WRAPPED = re.compile(r"^(?:```(?:json)?\s*(\{.*\})\s*```|<([A-Za-z_][\w-]{0,31})>\s*(\{.*\})"
                      r"\s*(?:</\2>)?)$", re.DOTALL)
"""A call as the whole answer in a Markdown code block or one tag (small models write it
so): group 1 or 3 is the call."""
_WRAP_START = re.compile(r"^(?:```json|```\s*\{|<[A-Za-z_][\w-]{0,31}>\s*\{)")
_MAY_WRAP = re.compile(r"^(?:`{1,3}(?:j(?:s(?:on?)?)?)?|```\s*|<(?:[A-Za-z_][\w-]{0,31}>?\s*)?)$")
"""The beginning of an answer that may still become a wrapped call."""


class ToolError(ValueError):
    """A client's tools, tool messages or response format are malformed."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Call:
    id: str
    name: str
    arguments: str
    """JSON text of an object."""

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "function",
                               "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            out["index"] = index
        return out


def _json_text(value: Any, param: str) -> str:
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if len(text) > MAX_TOOLS_CHARS:
        raise ToolError(f"'{param}' is longer than {MAX_TOOLS_CHARS} characters as JSON", param)
    return text


def tools_of(body: dict[str, Any]) -> tuple[str, list[str]]:
    """The body's `tools` as pichat carries them (JSON text of [{"name", "description",
    "parameters"}]; "" for none) and their names."""
    raw = body.get("tools")
    if raw is None or raw == []:
        return "", []
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise ToolError(f"'tools' must be a list of at most {MAX_TOOLS} functions", "tools")
    functions, names = [], []
    for i, tool in enumerate(raw):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or \
                not isinstance(tool.get("function"), dict):
            raise ToolError(f"'{param}' must be {{\"type\": \"function\", \"function\": "
                            "{...}}", param)
        f = tool["function"]
        name = f.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ToolError(f"'{param}.function.name' must be 1 to 64 letters, digits, _ . or "
                            "-", f"{param}.function.name")
        if name in names:
            raise ToolError(f"two tools are named {name!r}", f"{param}.function.name")
        description = f.get("description", "")
        if not isinstance(description, str):
            raise ToolError(f"'{param}.function.description' must be a string",
                            f"{param}.function.description")
        parameters = f.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"'{param}.function.parameters' must be a JSON schema object",
                            f"{param}.function.parameters")
        names.append(name)
        functions.append({"name": name, "description": description, "parameters": parameters})
    return _json_text(functions, "tools"), names


def choice_of(body: dict[str, Any], names: list[str]) -> str:
    """The body's `tool_choice` as pichat carries it: "", "none", "required",
    "function:NAME"."""
    raw = body.get("tool_choice")
    if raw is None or raw == "auto":
        return ""
    if raw in ("none", "required"):
        if raw == "required" and not names:
            raise ToolError("'tool_choice' is required but there are no tools", "tool_choice")
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("function"), dict):
        name = raw["function"].get("name")
        if isinstance(name, str) and name in names:
            return f"function:{name}"
        raise ToolError(f"'tool_choice' names a function that is not among the tools: "
                        f"{str(name)[:64]!r}", "tool_choice")
    raise ToolError("'tool_choice' must be none, auto, required or {\"type\": \"function\", "
                    "\"function\": {\"name\": ...}}", "tool_choice")


def format_of(body: dict[str, Any]) -> str:
    """The body's `response_format` as pichat carries it: "", "json", or a JSON schema."""
    raw = body.get("response_format")
    if raw is None:
        return ""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return ""
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise ToolError("'response_format.json_schema.schema' must be a JSON schema object",
                            "response_format")
        return schema_text(schema, "response_format")
    raise ToolError("'response_format.type' must be text, json_object or json_schema",
                    "response_format")


def schema_text(schema: dict[str, Any], param: str) -> str:
    """A schema to enforce, as pichat carries it (JSON text), once it is known to cost no
    more than a worker allows (the worker checks again as it makes the grammar)."""
    text = _json_text(schema, param)
    try:
        check_schema(schema)
    except SchemaError as exc:
        raise ToolError(f"'{param}' cannot be enforced: {exc}", param) from None
    return text


def calls_of(raw: Any, index: int) -> str:
    """An assistant message's `tool_calls` as pichat carries them (JSON text)."""
    param = f"messages[{index}].tool_calls"
    if raw is None or raw == []:
        return ""
    if not isinstance(raw, list) or len(raw) > MAX_TOOLS:
        raise ToolError(f"'{param}' must be a list", param)
    out = []
    for call in raw:
        f = call.get("function") if isinstance(call, dict) else None
        if not isinstance(f, dict) or not isinstance(call.get("id"), str) or \
                not isinstance(f.get("name"), str):
            raise ToolError(f"'{param}' items must be {{\"id\", \"type\": \"function\", "
                            "\"function\": {\"name\", \"arguments\"}}", param)
        arguments = f.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        out.append({"id": call["id"][:MAX_ID_CHARS], "name": f["name"][:64],
                    "arguments": arguments})
    return _json_text(out, param)


def check_tool_messages(messages: list[tuple[str, str, str]]) -> None:
    """(role, tool_calls JSON, tool_call_id) of each message: every tool message answers
    a call made before it."""
    made: set[str] = set()
    for i, (role, calls, answers) in enumerate(messages):
        if calls:
            made.update(c["id"] for c in json.loads(calls))
        if role == "tool":
            if not answers:
                raise ToolError(f"messages[{i}] is a tool result without a tool_call_id",
                                f"messages[{i}].tool_call_id")
            if answers not in made:
                raise ToolError(f"messages[{i}] answers the tool call {answers[:64]!r}, which "
                                "no earlier assistant message made",
                                f"messages[{i}].tool_call_id")


# --- reading calls out of an answer ----------------------------------------------------

def _call(obj: Any) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return Call("call_" + secrets.token_hex(8), obj["name"],
                json.dumps(arguments, ensure_ascii=False))


def extract(text: str, names: frozenset[str] | None = None) -> tuple[str, list[Call]]:
    """(the content, the calls) of an answer: no calls, and the whole text, if it holds
    none that parse (or, given the tools' `names`, one calls a function not among them)."""
    content, calls = _extract(text)
    if names is not None and any(c.name not in names for c in calls):
        return text, []
    return content, calls


def _extract(text: str) -> tuple[str, list[Call]]:
    if "<tool_call>" in text:
        calls = []
        for match in _HERMES.finditer(text):
            try:
                call = _call(json.loads(match.group(1)))
            except ValueError:
                return text, []
            if call is None:
                return text, []
            calls.append(call)
        return _HERMES.sub("", text).strip(), calls
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>"):].strip()
    if wrapped := _WRAPPED.match(body):
        body = wrapped.group(1) or wrapped.group(3)
    if body.startswith("{"):
        calls = []
        for part in _objects(body):
            call = _call(part)
            if call is None:
                return text, []
            calls.append(call)
        return "", calls
    return text, []


def _objects(text: str) -> list[Any]:
    """The JSON objects `text` is made of (separated by `;` or whitespace), or [] if it
    is not only that."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            obj, i = decoder.raw_decode(text, i)
        except ValueError:
            return []
        out.append(obj)
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return out


class Spotter:
    """A streamed answer's text, held back from where a tool call may begin: `feed`
    returns what may go out now; `finish` the rest and the calls."""

    def __init__(self, names: frozenset[str] | None = None) -> None:
        self._names = names
        self._held = ""
        self._sent_any = False
        self._capturing = False

    def feed(self, text: str) -> str:
        if self._capturing:
            self._held += text
            return ""
        pending = self._held + text
        start = pending.lstrip() if not self._sent_any else None
        if start is not None and (start.startswith("{") or _WRAP_START.match(start)):
            # a whole-answer call?
            self._capturing = True
            self._held = pending
            return ""
        cut = min((i for i in (pending.find(m) for m in _MARKERS) if i >= 0), default=-1)
        if cut >= 0:
            self._capturing = True
            self._held = pending[cut:]
            out = pending[:cut]
        else:  # keep back a tail that could begin a marker
            keep = 0
            for n in range(min(len(pending), max(map(len, _MARKERS)) - 1), 0, -1):
                if any(m.startswith(pending[-n:]) for m in _MARKERS):
                    keep = n
                    break
            if not self._sent_any and (not start or _MAY_WRAP.match(start)):
                keep = len(pending)  # only whitespace or a wrapper's start yet: a call may follow
            out, self._held = pending[:len(pending) - keep], pending[len(pending) - keep:]
        self._sent_any = self._sent_any or bool(out.strip())
        return out

    def finish(self) -> tuple[str, list[Call]]:
        """(the text still to send, the calls)."""
        held, self._held = self._held, ""
        if not self._capturing:
            return held, []
        content, calls = extract(held, self._names)
        return (content if calls else held), calls
