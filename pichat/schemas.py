"""What a JSON schema may cost before a worker makes a grammar of it.

A schema (OpenAI `response_format`, a tool's parameters, Ollama's `format`) becomes a GBNF
grammar through llama-cpp-python's converter, and the grammar then constrains every token
the model samples. Both steps can be made to cost without bound by a schema of a few hundred
bytes, so `check_schema` walks the schema once, with no expansion, and refuses before the
converter runs:

- **size**: the converter writes each repetition out (`minItems`, `maxLength`, a pattern's
  `a{30000000}`: 86 MB of grammar from 192 bytes), so every count is at most `MAX_REPEAT`
  and the grammar the schema would make is estimated, rule by rule, against
  `MAX_GRAMMAR_CHARS`;
- **shape**: nesting deeper than `MAX_DEPTH`, more than `MAX_NODES` sub-schemas, more than
  `MAX_PROPERTIES` properties in one object (the converter's optional-property rules grow
  with its square) or `MAX_ENUM` values in one enum (each is a grammar branch tried for
  every token) are refused;
- **ambiguity**: llama.cpp tries each token against every way the grammar could have read
  the text so far, and those ways multiply with an ambiguous pattern: measured on the
  default model's 151K-token vocabulary, `^([a-z]|[a-y]|[b-z])*$` costs 0.9 s per token,
  `^(a{0,10}){0,30}$` 0.5 s and `^(a{0,100}){0,100}$` more than a minute. `pattern_cost`
  bounds the number of readings alive at once (`MAX_READINGS`) and refuses an unbounded
  repetition whose item can be read in more than one way.

The router runs the same check on what it receives (a 400 before any worker is involved),
the worker on what it converts. The regex reading follows the converter's syntax: literals,
escapes, `.`, `[...]` classes, groups, `|`, and the quantifiers `* + ? {m} {m,} {m,n}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["SchemaError", "check_schema", "pattern_cost", "MAX_REPEAT", "MAX_DEPTH",
           "MAX_NODES", "MAX_PROPERTIES", "MAX_ENUM", "MAX_READINGS", "MAX_LIVE",
           "MAX_GRAMMAR_CHARS"]

MAX_GRAMMAR_CHARS = 256 * 1024
"""The grammar a schema makes, at most (the worker checks the converter's output too)."""
MAX_REPEAT = 1000
"""A count in a schema (minItems, maxLength...) or a pattern quantifier, at most."""
MAX_DEPTH = 32
"""Sub-schemas nested in each other (and groups in a pattern), at most."""
MAX_NODES = 4096
"""Sub-schemas in one schema, at most (Home Assistant's 40 tools make about 500)."""
MAX_PROPERTIES = 256
"""Properties of one object, at most."""
MAX_ENUM = 1024
"""Values of one enum, at most."""
MAX_READINGS = 2
"""Ways of reading one text a pattern may keep alive at once, at most: each token is tried
along every way (`^.*.*$` costs 40 ms a token, `^.*.*.*$` 240 ms, `^.*.*.*.*$` 2.9 s)."""
MAX_LIVE = 8
"""Places in a pattern that may be alive at once, at most (`^.{0,1000}.{0,1000}$` keeps
one more alive with each character read: 240 ms a token after 12; `^.*.{14}$`, 16 at
once, 160 ms)."""

_PRIMITIVES = 1024
"""The rules for strings, numbers, dates... that the converter adds when they are used."""
_RULE_ID = 12
"""A rule's name where another rule refers to it, and its parentheses (an estimate)."""


class SchemaError(ValueError):
    """The schema would cost more than this server enforces; the message names the bound."""


# ---------------------------------------------------------------------------------------
# Patterns


_ALL = (1 << 129) - 1
"""A set of characters as a bit mask: bits 0-127 for ASCII, bit 128 for all the rest."""
_OTHER = 1 << 128
_DOT = _ALL & ~(1 << 10) & ~(1 << 13)


def _bit(char: str) -> int:
    code = ord(char)
    return 1 << code if code < 128 else _OTHER


def _span(low: str, high: str) -> int:
    a, b = ord(low), ord(high)
    if a > b:
        return 0
    mask = ((1 << (min(b, 127) + 1)) - 1) & ~((1 << a) - 1) if a < 128 else 0
    return mask | (_OTHER if b >= 128 else 0)


@dataclass(frozen=True, slots=True)
class _Part:
    """What a piece of a pattern can read, as far as cost goes."""

    first: int
    """Characters it can begin with."""
    follow: int
    """Characters that can come next, within it, after a point where it could end."""
    nullable: bool
    width: int | None
    """Characters every match has (None: matches differ in length)."""
    readings: int
    """Ways of reading one text that can be alive at once (they multiply along a token)."""
    live: int
    """Places in it that can be alive at once (each is tried against every token)."""
    span: int
    """Places in it: all can be alive if it is entered at as many offsets."""
    size: int
    """Characters of grammar it makes."""
    literal: bool = False
    offsets: bool = False
    """It can end at several offsets at once: what follows it is entered at each."""


_EMPTY = _Part(0, 0, True, 0, 1, 1, 0, 0)


def _atom(mask: int, size: int, literal: bool = False) -> _Part:
    return _Part(mask, 0, False, 1, 1, 1, 1, size, literal)


def _seq(a: _Part, b: _Part) -> _Part:
    # Where a could end or go on, b could begin with the same character: both are alive,
    # and b can be entered at many offsets.
    overlap = bool(a.follow & b.first or (a.nullable and a.first & b.first))
    offsets = overlap or a.offsets
    return _Part(first=a.first | (b.first if a.nullable else 0),
                 follow=b.follow | ((a.follow | b.first) if b.nullable else 0),
                 nullable=a.nullable and b.nullable,
                 width=None if a.width is None or b.width is None else a.width + b.width,
                 readings=a.readings + b.readings if overlap else max(a.readings, b.readings),
                 live=a.live + b.span if offsets else max(a.live, b.live),
                 span=a.span + b.span, size=a.size + b.size + 1,
                 offsets=offsets or b.offsets)


def _alt(branches: list[_Part]) -> _Part:
    first = follow = 0
    for p in branches:
        first |= p.first
        follow |= p.follow
    widths = {p.width for p in branches}
    # The branches that can begin with one character are all tried on it.
    on: dict[int, tuple[int, int]] = {}
    for p in branches:
        bits = p.first
        while bits:
            bit = bits & -bits
            readings, live = on.get(bit, (0, 0))
            on[bit] = readings + p.readings, live + p.live
            bits ^= bit
    return _Part(first=first, follow=follow, nullable=any(p.nullable for p in branches),
                 width=widths.pop() if len(widths) == 1 else None,
                 readings=max([r for r, _ in on.values()] + [p.readings for p in branches]),
                 live=max([n for _, n in on.values()] + [p.live for p in branches]),
                 span=sum(p.span for p in branches), size=sum(p.size + 3 for p in branches),
                 offsets=any(p.offsets for p in branches))


def _repeat(item: _Part, low: int, high: int | None) -> _Part:
    if high == 0:
        return _EMPTY
    width = item.width * low if item.width is not None and low == high else None
    nullable = item.nullable or low == 0
    if high == 1:
        return _Part(item.first, item.follow, nullable, width, item.readings, item.live,
                     item.span, item.size + 1, offsets=item.offsets)
    # An item that can end where it could also go on, or be empty, or be read in two ways
    # lets each repetition begin at more than one place.
    ambiguous = (bool(item.follow & item.first) or item.nullable or item.readings > 1
                 or item.offsets)
    if ambiguous and high is None:
        raise SchemaError("its item can be read in more than one way (as in (a+)* or "
                          "(a|ab)*), which an unbounded repetition multiplies")
    span = item.span * (high or low + 1)
    readings, live = (high * item.readings, span) if ambiguous else (1, item.live)
    again = item.first if high is None or high > low or item.nullable else 0
    count = high if high is not None else low + 1
    # A literal character is written out each time; anything else becomes a rule, once,
    # referred to each time.
    size = item.size * count if item.literal else item.size + _RULE_ID * count
    return _Part(item.first, item.follow | again, nullable, width, readings, live, span,
                 size, offsets=ambiguous)


def _bounded(part: _Part) -> _Part:
    if part.readings > MAX_READINGS:
        raise SchemaError(f"it can be read in {part.readings} ways at once (at most "
                          f"{MAX_READINGS})")
    if part.live > MAX_LIVE:
        raise SchemaError(f"{part.live} places in it can be alive at once (at most "
                          f"{MAX_LIVE})")
    return part


class _Reader:
    """A recursive-descent reading of one pattern (with `^` and `$` taken off)."""

    def __init__(self, text: str, offset: int) -> None:
        self.text = text
        self.i = 0
        self.offset = offset

    def fail(self, message: str) -> SchemaError:
        return SchemaError(f"{message} (at index {self.i + self.offset})")

    def alternation(self, depth: int) -> _Part:
        if depth > MAX_DEPTH:
            raise self.fail(f"groups nested more than {MAX_DEPTH} deep")
        branches = [self.sequence(depth)]
        while self.i < len(self.text) and self.text[self.i] == "|":
            self.i += 1
            branches.append(self.sequence(depth))
            if len(branches) > MAX_ENUM:
                raise self.fail(f"more than {MAX_ENUM} alternatives")
        return self.bounded(branches[0] if len(branches) == 1 else _alt(branches))

    def bounded(self, part: _Part) -> _Part:
        try:
            return _bounded(part)
        except SchemaError as exc:
            raise self.fail(str(exc)) from None

    def sequence(self, depth: int) -> _Part:
        part = _EMPTY
        text = self.text
        while self.i < len(text) and text[self.i] not in "|)":
            atom = self.atom(depth)
            while self.i < len(text) and text[self.i] in "*+?{":
                where = self.i
                low, high = self.quantifier()
                try:
                    atom = _bounded(_repeat(atom, low, high))
                except SchemaError as exc:
                    raise SchemaError(f"the repetition at index {where + self.offset}: "
                                      f"{exc}") from None
            part = self.bounded(_seq(part, atom))
            if part.size > MAX_GRAMMAR_CHARS:
                raise self.fail(f"it makes more than {MAX_GRAMMAR_CHARS} characters of "
                                "grammar")
        return part

    def quantifier(self) -> tuple[int, int | None]:
        c = self.text[self.i]
        self.i += 1
        if c == "*":
            return 0, None
        if c == "+":
            return 1, None
        if c == "?":
            return 0, 1
        end = self.text.find("}", self.i)
        if end < 0:
            raise self.fail("an unclosed {")
        inner = self.text[self.i:end]
        self.i = end + 1
        m = re.fullmatch(r"\s*(\d*)\s*(?:(,)\s*(\d*)\s*)?", inner)
        if m is None or (not m.group(1) and not m.group(2)):
            raise self.fail(f"the quantifier {{{inner[:20]}}} is not {{m}}, {{m,}} or {{m,n}}")
        low = int(m.group(1)) if m.group(1) else 0
        high = low if not m.group(2) else int(m.group(3)) if m.group(3) else None
        for n in (low, high):
            if n is not None and n > MAX_REPEAT:
                raise self.fail(f"the quantifier {{{inner[:20]}}} is more than this "
                                f"server enforces ({MAX_REPEAT})")
        if high is not None and high < low:
            raise self.fail(f"the quantifier {{{inner[:20]}}} has its maximum below its "
                            "minimum")
        return low, high

    def atom(self, depth: int) -> _Part:
        text = self.text
        c = text[self.i]
        if c == "(":
            self.i += 1
            if self.i < len(text) and text[self.i] == "?":
                raise self.fail("(?...) groups are not supported")
            inner = self.alternation(depth + 1)
            if self.i >= len(text) or text[self.i] != ")":
                raise self.fail("an unclosed (")
            self.i += 1
            return _Part(inner.first, inner.follow, inner.nullable, inner.width,
                         inner.readings, inner.live, inner.span, inner.size + 2,
                         offsets=inner.offsets)
        if c == "[":
            return self.klass()
        if c in "*+?{":
            raise self.fail(f"{c} follows nothing")
        if c in "]}":
            raise self.fail(f"an unopened {c}")
        self.i += 1
        if c == ".":
            return _atom(_DOT, 4)
        if c == "\\":
            if self.i >= len(text):
                raise self.fail("a \\ ends the pattern")
            c = text[self.i]
            self.i += 1
        return _atom(_bit(c), 2, literal=True)

    def klass(self) -> _Part:
        text = self.text
        start = self.i
        self.i += 1
        negated = self.i < len(text) and text[self.i] == "^"
        self.i += negated
        chars: list[str] = []
        while self.i < len(text) and text[self.i] != "]":
            if text[self.i] == "\\" and self.i + 1 < len(text):
                self.i += 1
            chars.append(text[self.i])
            self.i += 1
        if self.i >= len(text):
            self.i = start
            raise self.fail("an unclosed [")
        self.i += 1
        mask = 0
        k = 0
        while k < len(chars):
            if k + 2 < len(chars) and chars[k + 1] == "-":
                mask |= _span(chars[k], chars[k + 2])
                k += 3
            else:
                mask |= _bit(chars[k])
                k += 1
        if negated:
            mask = (_ALL & ~mask) | _OTHER
        return _atom(mask, self.i - start + 2)


def pattern_cost(pattern: str) -> int:
    """The characters of grammar `pattern` makes (an estimate); SchemaError if it would
    cost more than this server enforces."""
    text = pattern[1:] if pattern.startswith("^") else pattern
    text = text[:-1] if text.endswith("$") and not text.endswith("\\$") else text
    reader = _Reader(text, int(pattern.startswith("^")))
    part = reader.alternation(0)
    if reader.i < len(text):
        raise reader.fail("an unopened )")
    return part.size


# ---------------------------------------------------------------------------------------
# Schemas


def _count(schema: dict[str, Any], key: str) -> int | None:
    value = schema.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value < 0 or value > MAX_REPEAT:
        raise SchemaError(f"{key} {value} is outside what this server enforces "
                          f"(0 to {MAX_REPEAT})")
    return int(value)


def _own_cost(schema: dict[str, Any], name: int) -> int:
    """The grammar one sub-schema makes itself (its children are counted apart)."""
    cost = 2 * name + 32
    for low_key, high_key, each in (("minItems", "maxItems", name + 16),
                                    ("minLength", "maxLength", 9),
                                    ("minProperties", "maxProperties", 8)):
        low, high = _count(schema, low_key), _count(schema, high_key)
        if low is not None and high is not None and high < low:
            raise SchemaError(f"{high_key} {high} is less than {low_key} {low}")
        cost += max(low or 0, high or 0) * each
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        try:
            cost += pattern_cost(pattern)
        except SchemaError as exc:
            raise SchemaError(f"pattern {pattern[:80]!r}: {exc}") from None
    enum = schema.get("enum")
    if isinstance(enum, list):
        if len(enum) > MAX_ENUM:
            raise SchemaError(f"an enum of {len(enum)} values (at most {MAX_ENUM})")
        cost += 2 * len(json.dumps(enum))
    if "const" in schema:
        cost += 2 * len(json.dumps(schema["const"]))
    properties = schema.get("properties")
    if isinstance(properties, dict):
        if len(properties) > MAX_PROPERTIES:
            raise SchemaError(f"an object of {len(properties)} properties (at most "
                              f"{MAX_PROPERTIES})")
        cost += sum(len(key) + 16 for key in properties) * 2
    return cost


def check_schema(schema: Any) -> int:
    """The characters of grammar `schema` (a decoded JSON schema) makes, estimated without
    expanding anything; SchemaError naming the bound it would break."""
    total = _PRIMITIVES
    nodes = 0
    # (sub-schema, the length of the rule name the converter gives it, depth)
    stack: list[tuple[Any, int, int]] = [(schema, 4, 0)]
    while stack:
        node, name, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SchemaError(f"sub-schemas nested more than {MAX_DEPTH} deep")
        if isinstance(node, list):
            stack.extend((v, name + 4, depth + 1) for v in node if isinstance(v, dict | list))
            continue
        nodes += 1
        if nodes > MAX_NODES:
            raise SchemaError(f"more than {MAX_NODES} sub-schemas")
        total += _own_cost(node, name)
        if total > MAX_GRAMMAR_CHARS:
            raise SchemaError(f"it makes more than {MAX_GRAMMAR_CHARS} characters of grammar "
                              "(lower its counts and repetitions)")
        # Every value, not only the keys that hold schemas: a $ref can point anywhere.
        stack.extend((value, name + 1 + len(str(key)), depth + 1)
                     for key, value in node.items() if isinstance(value, dict | list))
    return total
