"""Tools and structured output on the worker: what the chat template is given, and the
grammar an answer must follow.

The tools go into the prompt through the model's own chat template (it receives `tools`
and messages with `tool_calls` / `tool_call_id`, as llama.cpp's server and Transformers
give them). A template that knows no tools gets them in the system prompt instead, with
the Hermes syntax (`GENERIC`). How a model writes a call depends on its template family:

- `hermes` (Qwen 2.5 and 3, Hermes, many others): `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`;
- `llama3` (Llama 3.1-3.3): a JSON object `{"name": ..., "parameters": {...}}`.

The router reads calls out of the answer's text (pichat/router/api/tools.py) whatever the
family. With `tool_choice` "required" or a named function, and with a response `format`,
the answer is constrained by a GBNF grammar (llama.cpp's grammar sampler; the JSON schema
to grammar converter of llama-cpp-python), so that it always parses.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from pichat.errors import BadRequest
from pichat.protocol import ChatMessage, Request
from pichat.schemas import MAX_GRAMMAR_CHARS, SchemaError, check_schema
from pichat.worker.engine.toolfit import prompt_form

__all__ = ["Family", "family_of", "template_messages", "template_tools", "grammar_for",
           "GENERIC", "MAX_GRAMMAR_CHARS", "TOOL_CALL", "TRIGGERS"]

Family = Literal["hermes", "llama3", "generic"]

GENERIC = (
    "You can call functions. These are the functions, as JSON schemas:\n{tools}\n"
    "To call one, answer with only this, nothing before or after it:\n"
    '<tool_call>\n{{"name": "the function\'s name", "arguments": {{...}}}}\n</tool_call>')
"""For templates that know no tools: put in the system prompt."""


def family_of(template: str) -> Family:
    """Which call syntax a chat template teaches its model."""
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ("ipython" in template and "parameters" in template):
        return "llama3"
    return "hermes" if "tools" in template else "generic"


def _calls(message: ChatMessage) -> list[dict[str, Any]]:
    try:
        calls = json.loads(message.tool_calls) if message.tool_calls else []
    except ValueError:
        raise BadRequest("a message's tool_calls are not JSON") from None
    out = []
    for call in calls if isinstance(calls, list) else []:
        if not isinstance(call, dict):
            continue
        try:
            arguments = json.loads(call.get("arguments") or "{}")
        except (TypeError, ValueError):
            arguments = call.get("arguments")
        out.append({"id": call.get("id", ""), "type": "function",
                    "function": {"name": call.get("name", ""), "arguments": arguments}})
    return out


def template_tools(tools: str, compact: bool = False) -> list[dict[str, Any]] | None:
    """The request's tools as chat templates expect them (OpenAI's shape); `compact`: in
    the form the prompt shows (pichat/worker/engine/toolfit.py)."""
    if not tools:
        return None
    try:
        functions = json.loads(tools)
    except (ValueError, RecursionError):
        raise BadRequest("tools are not JSON (or nested too deeply)") from None
    if not isinstance(functions, list):
        raise BadRequest("tools must be a list")
    try:
        return [{"type": "function", "function": prompt_form(f) if compact else f}
                for f in functions if isinstance(f, dict)]
    except RecursionError:
        raise BadRequest("tools: a schema is nested too deeply") from None


def template_messages(messages: Sequence[ChatMessage], tools: list[dict[str, Any]] | None,
                      family: Family) -> list[dict[str, Any]]:
    """`messages` as the chat template is given them. For a template without tools, the
    tools go in the system prompt and calls and results become plain text."""
    out: list[dict[str, Any]] = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.content}
        calls = _calls(m) if m.tool_calls else []
        if family == "generic":
            if calls:
                item["content"] = (m.content + "\n" if m.content else "") + "\n".join(
                    "<tool_call>\n" + json.dumps({"name": c["function"]["name"],
                                                 "arguments": c["function"]["arguments"]})
                    + "\n</tool_call>" for c in calls)
            if m.role == "tool":
                item = {"role": "user", "content": f"<tool_response>\n{m.content}\n"
                                                   "</tool_response>"}
        else:
            if calls:
                item["tool_calls"] = calls
            if m.tool_call_id:
                item["tool_call_id"] = m.tool_call_id
        out.append(item)
    if family == "generic" and tools:
        text = GENERIC.format(tools="\n".join(json.dumps(t["function"], ensure_ascii=False)
                                              for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


TOOL_CALL = "<tool_call>"
TRIGGERS = (r"<tool_call>", r"\A\s*\{\s*\"name\"\s*:")
"""Where a call starts in an answer that may also be text (Python patterns, searched in
the answer so far; the grammar applies from the match on): a Hermes `<tool_call>`, or a
bare JSON call as the whole answer (what small Qwen models often write instead)."""


def grammar_for(request: Request, family: Family) -> tuple[str, str]:
    """The GBNF grammar `request`'s answer must follow ("" for none), and the pattern from
    whose match on it applies ("": from the start). With tools and tool_choice auto, a
    Hermes-style call is constrained from its `<tool_call>` on (a call of a function that
    exists, with arguments that match its schema) and text before it is free. Raises
    BadRequest naming what cannot be enforced."""
    choice = request.tool_choice
    if choice == "required" or choice.startswith("function:"):
        return _call_grammar(request, family), ""
    if request.format == "json":
        from llama_cpp.llama_grammar import JSON_GBNF

        return JSON_GBNF, ""
    if request.format:
        return _schema_grammar(request.format, "response_format"), ""
    if request.tools and choice != "none" and family != "llama3":
        grammar = _call_grammar(request, family, bare=True)
        return (grammar, "\n".join(TRIGGERS)) if grammar else ("", "")
    return "", ""


_SPACE = re.compile(r'^space ::= " "\?$', re.MULTILINE)


class _TooBig(Exception):
    pass


@functools.cache
def _converter_class() -> type:
    from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, SchemaConverter

    class Converter(SchemaConverter):
        """llama-cpp-python's converter with a budget on what it writes and a name for
        each new rule found at once (its own search is quadratic in rules of one name)."""

        def __init__(self) -> None:
            super().__init__(prop_order={}, allow_fetch=False, dotall=False,
                             raw_pattern=False)
            self._written = 0
            self._named: dict[tuple[str, str], str] = {}
            self._next: dict[str, int] = {}

        def _add_rule(self, name: str, rule: str) -> str:
            base = INVALID_RULE_CHARS_RE.sub("-", name)
            key = self._named.get((base, rule))
            if key is None:
                if self._rules.get(base, rule) == rule:
                    key = base
                else:
                    i = self._next.get(base, 0)
                    while f"{base}{i}" in self._rules:
                        i += 1
                    self._next[base] = i + 1
                    key = f"{base}{i}"
                self._named[(base, rule)] = key
            if self._rules.get(key) != rule:
                self._written += len(key) + len(rule) + 5
                if self._written > MAX_GRAMMAR_CHARS:
                    raise _TooBig
                self._rules[key] = rule
            return key

    return Converter


def _schema_grammar(schema: str, what: str) -> str:
    try:
        decoded = json.loads(schema)
        check_schema(decoded)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, SchemaError):
            raise BadRequest(f"{what}: {exc}") from None
        raise BadRequest(f"{what}: the schema is not JSON (or nested too deeply)") from None
    try:
        converter = _converter_class()()
        converter.visit(converter.resolve_refs(decoded, "stdin"), "")
        grammar = converter.format_grammar()
    except _TooBig:
        raise BadRequest(f"{what}: the schema makes more than {MAX_GRAMMAR_CHARS} "
                         "characters of grammar: lower its counts and repetitions") from None
    except RecursionError:
        raise BadRequest(f"{what}: the schema is nested too deeply") from None
    except Exception as exc:  # the converter's ValueError, AssertionError, KeyError...
        raise BadRequest(f"{what}: the schema cannot be enforced: "
                         f"{type(exc).__name__}: {str(exc)[:200]}") from None
    # JSON as models write it, pretty-printed too (the converter allows one space only;
    # this is llama.cpp's own rule: bounded, so a model cannot loop on whitespace).
    grammar = _SPACE.sub(r'space ::= | " " | "\\n"{1,2} [ \\t]{0,20}', grammar)
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise BadRequest(f"{what}: the schema makes {len(grammar)} characters of grammar "
                         f"(at most {MAX_GRAMMAR_CHARS}): lower its counts and repetitions")
    return grammar


_SCHEMA_KEYS = frozenset(("type", "$ref", "anyOf", "oneOf", "allOf", "enum", "const",
                          "properties", "items", "not", "pattern", "format"))


def _any_typeless(schema: Any) -> Any:
    """`schema` with every sub-schema that says nothing of its type (Home Assistant's
    `{"description": ...}` for "any value") made `{}`, which the converter takes as any
    JSON value."""
    if isinstance(schema, list):
        return [_any_typeless(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    if not _SCHEMA_KEYS & schema.keys():
        return {}
    out = {}
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {k: _any_typeless(v) for k, v in value.items()}
        elif key in ("items", "anyOf", "oneOf", "allOf", "additionalProperties", "not"):
            out[key] = _any_typeless(value)
        else:
            out[key] = value
    return out


def _call_grammar(request: Request, family: Family, bare: bool = False) -> str:
    """A call of one of the request's functions in the family's syntax (`bare`: a
    Hermes-style call may also come as its bare JSON object)."""
    functions = [t["function"] for t in template_tools(request.tools) or []]
    if request.tool_choice.startswith("function:"):
        name = request.tool_choice.split(":", 1)[1]
        functions = [f for f in functions if f.get("name") == name]
        if not functions:
            raise BadRequest(f"tool_choice names {name!r}, which is not among the tools")
    if not functions:
        raise BadRequest("tool_choice asks for a call but there are no tools")
    key = "parameters" if family == "llama3" else "arguments"
    try:
        try:
            calls = [{"type": "object",
                      "properties": {"name": {"const": f.get("name", "")},
                                     key: _any_typeless(f.get("parameters")
                                                        or {"type": "object"})},
                      "required": ["name", key]} for f in functions]
            text = json.dumps(calls[0] if len(calls) == 1 else {"anyOf": calls})
        except RecursionError:
            raise BadRequest("tools: a schema is nested too deeply") from None
        grammar = _schema_grammar(text, "tools")
    except BadRequest:
        if not bare:
            raise
        # tool_choice auto: a call is read from the text instead (never an error).
        return ""
    if family == "llama3":
        return grammar
    grammar = "\n".join("call ::= " + line[len("root ::= "):] if line.startswith("root ::= ")
                        else line for line in grammar.splitlines())
    root = 'root ::= "<tool_call>\\n" call "\\n</tool_call>"'
    if bare:  # from a trigger on: re-tokenized, the call may get a leading space (SPM)
        root = 'root ::= [ \\t\\n]{0,4} ("<tool_call>\\n" call "\\n</tool_call>" | call)'
    return root + "\n" + grammar
