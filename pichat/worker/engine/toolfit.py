"""Tools that do not fit the context: the most relevant kept, the rest left out and named.

Clients send their whole tool list with every request: Open WebUI its built-in tools,
Home Assistant one tool per kind of action plus its devices, agent frameworks dozens.
Rendered by the chat template, such a list can take more of the context than the
conversation itself. Refusing the request would fail a user who typed eight words, so:

1. The tools reach the template in a compact form (`prompt_form`): descriptions with
   their whitespace collapsed and long ones cut, and the schema keys that say nothing to
   a model (`title`, `$schema`, `additionalProperties: false`, empty `required`...) gone.
   Only the prompt sees this form: the grammar that holds a call to its schema, and the
   router reading calls, use the tools as sent.
2. When the prompt still does not fit, the conversation keeps the room it needs (its
   system prompt and newest turn, and a quarter of the room for history) and the tools
   get the rest: the most relevant first, ranked by similarity to the last user
   message (the worker's own embeddings of each tool's name and description, cached,
   plus the share of the message's words the tool's text contains), tools the
   conversation already called and a tool `tool_choice` names first of all. The tools
   left out are named in the answer (`pichat.tools_left_out`).
3. A conversation keeps its choice while it still fits (history may then shrink to an
   eighth of the room) and still holds the tool its new message needs most: the tools
   are rendered at the prompt's start, so a choice changed every turn would make every
   turn read the whole prompt again (`Fitter`).

`choose`, `relevance` and `prompt_form` are pure (table-tested); `Fitter` binds them to a
model (its tokenizer, template and embeddings).
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from pichat.protocol import ChatMessage

__all__ = ["Choice", "Fitter", "choose", "prompt_form", "query_of", "relevance",
           "tool_text", "DESCRIPTION_CHARS", "PARAM_DESCRIPTION_CHARS"]

DESCRIPTION_CHARS = 1024
"""A function's description is cut after this many characters in the prompt."""
PARAM_DESCRIPTION_CHARS = 256
"""... a parameter's, after this many."""
LEXICAL_WEIGHT = 0.5
"""How much the share of the message's words found in a tool's text adds to the cosine of
their embeddings (both in [0, 1]): it rescues the exact words (a device's name) that a
small chat model's embeddings blur."""
_EMBED_CHARS = 1000
"""A tool's text is embedded from at most this many characters (well within the worker's
512-token embedding inputs)."""
_CACHED_VECTORS = 4096
_CACHED_CHOICES = 4096
_NOISE = ("title", "$schema", "examples", "$comment")
_WORD = re.compile(r"[a-z0-9]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_STOP = frozenset(
    "the a an and or of to in on at for is are was be it this that with from by as what "
    "how can you your me my i we our please could would should do does did will".split())


def _short(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _prune(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_prune(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _NOISE or (key == "additionalProperties" and value is False) or \
                (key in ("required", "enum") and value == []) or \
                (key == "default" and value is None):
            continue
        if key == "description" and isinstance(value, str):
            if not value.strip():
                continue
            value = _short(value, PARAM_DESCRIPTION_CHARS)
        elif key == "properties" and isinstance(value, dict):
            value = {name: _prune(v) for name, v in value.items()}
        else:
            value = _prune(value)
        out[key] = value
    return out


def prompt_form(function: dict[str, Any]) -> dict[str, Any]:
    """`function` ({"name", "description", "parameters"}) as the prompt shows it."""
    out: dict[str, Any] = {"name": function.get("name", "")}
    description = function.get("description")
    if isinstance(description, str) and description.strip():
        out["description"] = _short(description, DESCRIPTION_CHARS)
    parameters = function.get("parameters")
    if isinstance(parameters, dict):
        out["parameters"] = _prune(parameters)
    return out


def tool_text(function: dict[str, Any]) -> str:
    """What a tool is about, for ranking: its name in words, its description, the names
    and descriptions of its parameters."""
    name = str(function.get("name", ""))
    parts = [_CAMEL.sub(" ", name).replace("_", " ").replace("-", " "),
             str(function.get("description", ""))]
    props = (function.get("parameters") or {}).get("properties")
    if isinstance(props, dict):
        for key, value in props.items():
            parts.append(str(key).replace("_", " "))
            if isinstance(value, dict) and isinstance(value.get("description"), str):
                parts.append(value["description"])
    return " ".join(" ".join(parts).split())[:_EMBED_CHARS]


def query_of(messages: Sequence[ChatMessage]) -> str:
    """What the tools are ranked against: the last user message (the newest request, also
    when tool results came after it)."""
    for m in reversed(messages):
        if m.role == "user" and m.content.strip():
            return m.content[-_EMBED_CHARS:]
    return ""


def _stems(text: str) -> set[str]:
    words = _WORD.findall(_CAMEL.sub(" ", text).lower())
    return {w.rstrip("s")[:6] for w in words if len(w) > 2 and w not in _STOP}


def relevance(query_vector: Sequence[float] | None, vectors: Sequence[Sequence[float] | None],
              query: str, texts: Sequence[str]) -> list[float]:
    """Each tool's relevance to the query: the cosine of their unit vectors (0 where there
    is none) plus `LEXICAL_WEIGHT` x the share of the query's words in the tool's text."""
    words = _stems(query)
    out = []
    for vector, text in zip(vectors, texts, strict=True):
        cosine = sum(a * b for a, b in zip(query_vector, vector)) \
            if query_vector is not None and vector is not None else 0.0
        lexical = len(words & _stems(text)) / len(words) if words else 0.0
        out.append(cosine + LEXICAL_WEIGHT * lexical)
    return out


def choose(scores: Sequence[float], costs: Sequence[int], budget: int,
           first: Sequence[int] = ()) -> list[int]:
    """The tools to keep (indices, in the request's order): those in `first`, then the
    highest scores (the request's order breaking ties), while their costs (tokens) add up
    to at most `budget`. A tool that does not fit is passed over for smaller ones after
    it."""
    order = list(dict.fromkeys([*first, *sorted(range(len(scores)),
                                                key=lambda i: (-scores[i], i))]))
    kept, spent = [], 0
    for i in order:
        if spent + costs[i] <= budget:
            kept.append(i)
            spent += costs[i]
    return sorted(kept)


@dataclass(frozen=True, slots=True)
class Choice:
    tools: str
    """The kept tools, as the request carries them (JSON text; "" for none)."""
    left_out: tuple[str, ...] = ()
    """The names of the tools left out, in the request's order."""


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


class Fitter:
    """Chooses, for one model, which of a request's tools its prompt holds.

    `count(messages, tools)` is the prompt's length in tokens; `tokens(text)` a text's;
    `embed(texts)` unit vectors (little-endian float32s) of texts. Thread-safe: slots call
    it from their own threads."""

    def __init__(self, *, count: Callable[[Sequence[ChatMessage], str], int],
                 tokens: Callable[[str], int],
                 embed: Callable[[Sequence[str]], Sequence[bytes]] | None) -> None:
        self._count = count
        self._tokens = tokens
        self._embed = embed
        self._lock = threading.Lock()
        self._vectors: OrderedDict[bytes, tuple[float, ...] | None] = OrderedDict()
        self._choices: OrderedDict[tuple[str, str], tuple[bytes, frozenset[str]]] = \
            OrderedDict()

    def fit(self, messages: Sequence[ChatMessage], tools: str, *, room: int,
            owner: str | None = None, session: str | None = None,
            named: str = "") -> Choice:
        """The tools of a request whose prompt (`messages` with `tools`) must fit in
        `room` tokens; `named`: a tool that must stay (tool_choice names it)."""
        functions = [f for f in json.loads(tools) if isinstance(f, dict)] if tools else []
        if not functions or self._count(messages, tools) <= room:
            return Choice(tools)
        head = 0
        while head < len(messages) and messages[head].role == "system":
            head += 1
        starts = [i for i in range(head, len(messages)) if messages[i].role == "user"]
        newest = list(messages[:head]) + list(messages[starts[-1] if starts else head:])
        base = self._count(newest, "")
        # History keeps a quarter of the room whatever its length now, so the budget does
        # not shrink turn after turn (a choice kept may let it shrink to an eighth).
        budget = room - base - room // 4
        keeping = room - base - room // 8
        names = [str(f.get("name", "")) for f in functions]
        costs = [self._tokens(json.dumps({"type": "function", "function": prompt_form(f)},
                                         ensure_ascii=False)) + 1 for f in functions]
        query = query_of(messages)
        scores = self._scores(query, functions)
        called = {c for m in messages for c in _called(m)}
        first = [names.index(named)] if named in names else []
        first += [i for i, n in enumerate(names) if n in called and n != named]
        key = (owner or "", session) if session else None
        whole = _digest(tools)
        kept = self._sticky(key, whole, names, costs, scores, keeping)
        # The costs are of each tool alone: check the whole prompt, and drop the least
        # relevant until it fits (the conversation then slides as it must).
        limit = budget if kept is None else keeping
        if kept is None:
            kept = choose(scores, costs, max(0, budget), first)
        while kept and self._count(newest, _json([functions[i] for i in kept])) - base > limit:
            kept.remove(min((i for i in kept if i not in first[:1]),
                            key=lambda i: (scores[i], -i), default=kept[-1]))
        if key is not None:
            with self._lock:
                self._choices[key] = (whole, frozenset(names[i] for i in kept))
                self._choices.move_to_end(key)
                while len(self._choices) > _CACHED_CHOICES:
                    self._choices.popitem(last=False)
        kept_set = set(kept)
        return Choice(_json([functions[i] for i in kept]),
                      tuple(n for i, n in enumerate(names) if i not in kept_set))

    def _sticky(self, key: tuple[str, str] | None, whole: bytes, names: list[str],
                costs: list[int], scores: list[float], budget: int) -> list[int] | None:
        """The conversation's earlier choice, if it still fits and still holds the tool
        this message needs most."""
        if key is None:
            return None
        with self._lock:
            earlier = self._choices.get(key)
        if earlier is None or earlier[0] != whole:
            return None
        kept = [i for i, n in enumerate(names) if n in earlier[1]]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        if best not in kept or sum(costs[i] for i in kept) > budget:
            return None
        return kept

    def _scores(self, query: str, functions: list[dict[str, Any]]) -> list[float]:
        texts = [tool_text(f) for f in functions]
        vectors: list[tuple[float, ...] | None] = [None] * len(texts)
        query_vector = None
        if self._embed is not None and query:
            found = self._vectors_of([query, *texts])
            query_vector, vectors = found[0], found[1:]
        return relevance(query_vector, vectors, query, texts)

    def _vectors_of(self, texts: list[str]) -> list[tuple[float, ...] | None]:
        keys = [_digest(t) for t in texts]
        with self._lock:
            known = {k: self._vectors[k] for k in keys if k in self._vectors}
        missing = list(dict.fromkeys(k for k in keys if k not in known))
        if missing:
            by_key = dict(zip(keys, texts, strict=True))
            assert self._embed is not None
            try:
                raw: Sequence[bytes] = []
                for start in range(0, len(missing), 16):
                    raw = [*raw, *self._embed([by_key[k] for k in missing[start:start + 16]])]
                found = [struct.unpack(f"<{len(v) // 4}f", v) for v in raw]
            except Exception:  # no embeddings here: rank by words alone
                found = [None] * len(missing)
            with self._lock:
                for k, v in zip(missing, found, strict=True):
                    known[k] = self._vectors[k] = v
                while len(self._vectors) > _CACHED_VECTORS:
                    self._vectors.popitem(last=False)
        return [known[k] for k in keys]


def _called(message: ChatMessage) -> list[str]:
    if not message.tool_calls:
        return []
    try:
        calls = json.loads(message.tool_calls)
    except ValueError:
        return []
    return [str(c.get("name", "")) for c in calls if isinstance(c, dict)] \
        if isinstance(calls, list) else []


def _json(functions: list[dict[str, Any]]) -> str:
    return json.dumps(functions, ensure_ascii=False, separators=(",", ":")) if functions else ""
