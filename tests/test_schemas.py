"""What a JSON schema may cost before a grammar is made of it: the worst schemas we could
build are refused before any expansion, by the router and by the worker, each with a
message naming its bound; real schemas and patterns still become grammars."""

from __future__ import annotations

import glob
import json
import os
import tracemalloc

import pytest

from pichat.errors import BadRequest
from pichat.protocol import ChatMessage, Request, RequestId
from pichat.router.api.tools import ToolError, format_of, tools_of
from pichat.schemas import MAX_DEPTH, MAX_ENUM, MAX_NODES, MAX_PROPERTIES, SchemaError, check_schema
from pichat.worker.engine.tools import grammar_for

HERE = os.path.dirname(__file__)


def ask(**kw) -> Request:
    return Request(RequestId("r"), (ChatMessage("user", "x"),), **kw)


def pattern(p: str) -> dict:
    return {"type": "string", "pattern": p}


def nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


BOMBS = [
    # Repetitions the converter would write out.
    (pattern("^a{30000000}$"), "quantifier {30000000} is more than"),
    (pattern("^(ab){1001}$"), "quantifier {1001}"),
    (pattern("^a{5,3}$"), "maximum below its minimum"),
    (pattern("^a{-5}$"), "is not {m}"),
    (pattern("^" + "[a-z]{1000}" * 30 + "$"), "characters of grammar"),
    ({"type": "array", "minItems": 10**8, "items": {"type": "string"}}, "minItems"),
    ({"type": "string", "maxLength": 1001}, "maxLength"),
    ({"type": "array", "minItems": 5, "maxItems": 2}, "less than minItems"),
    ({"type": "string", "minLength": -1}, "minLength"),
    ({"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000}
                                       for i in range(40)}}, "characters of grammar"),
    # Long names make long rule names, written out at each repetition.
    ({"type": "object", "properties": {"x" * 3000: {"type": "object", "properties": {
        "y" * 3000: {"type": "array", "minItems": 1000, "items": {}}}}}},
     "characters of grammar"),
    # Ambiguous patterns: each token would be tried along every reading.
    (pattern("^(a+)+$"), "more than one way"),
    (pattern("^(a|aa|aaa)*$"), "ways at once"),
    (pattern("^(.|.)*$"), "more than one way"),
    (pattern("^([a-z]|[a-y]|[b-z])*$"), "ways at once"),
    (pattern("^([a-z]|[a-y]|[b-z]){0,200}$"), "ways at once"),
    (pattern("^(a{0,10}){0,30}$"), "ways at once"),
    (pattern("^(a{0,100}){0,100}$"), "ways at once"),
    (pattern("^((a{0,10}){0,10}){0,10}$"), "ways at once"),
    (pattern("^.*.*.*$"), "ways at once"),
    (pattern("^.{0,1000}.{0,1000}$"), "alive at once"),
    (pattern("^" + "a{0,40}" * 25 + "$"), "alive at once"),
    (pattern("^[^x]*" + "[^y]" * 20 + "$"), "alive at once"),
    (pattern("^(" + "|".join(f"w{i}" for i in range(MAX_ENUM + 1)) + ")$"), "alternatives"),
    (pattern("^" + "(" * 40 + "a" + ")" * 40 + "$"), "nested more than"),
    (pattern("^(?=a)b$"), "not supported"),
    (pattern("^[abc$"), "unclosed ["),
    # Shapes: width, depth, count.
    ({"enum": list(range(MAX_ENUM + 1))}, "enum of"),
    ({"type": "object", "properties": {f"p{i}": {} for i in range(MAX_PROPERTIES + 1)}},
     "properties"),
    (nested(MAX_DEPTH + 1), "nested more than"),
    ({"type": "array", "items": {"anyOf": json.loads("[" * 34 + "{}" + "]" * 34)}},
     "nested more than"),
    ({"anyOf": [{}] * (MAX_NODES + 1)}, "sub-schemas"),
    # A $ref can point anywhere in the document: what it points at is checked too.
    ({"$ref": "#/x/y", "x": {"y": pattern("^a{30000000}$")}}, "quantifier"),
    ({"$ref": "#/$defs/s", "$defs": {"s": pattern("^(a+)+$")}}, "more than one way"),
]


@pytest.mark.parametrize("schema,message", BOMBS, ids=[m for _, m in BOMBS])
def test_a_grammar_bomb_is_refused_before_any_expansion_by_router_and_worker(schema, message):
    text = json.dumps(schema)
    tracemalloc.start()
    try:
        with pytest.raises(BadRequest, match="response_format") as worker:
            grammar_for(ask(format=text), "hermes")
        with pytest.raises(BadRequest, match="tools"):
            grammar_for(ask(tools=json.dumps([{"name": "f", "parameters": schema}]),
                            tool_choice="required"), "hermes")
        with pytest.raises(ToolError) as router:
            format_of({"response_format": {"type": "json_schema",
                                           "json_schema": {"name": "x", "schema": schema}}})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert message in str(worker.value) and message in str(router.value)
    assert router.value.param == "response_format"
    # Nothing was written out: the check holds about the schema's own size, not 86 MB.
    assert peak < 16 * len(text) + 4 * 2**20, peak
    # With tool_choice auto a call is read from the text instead: no grammar, no error.
    assert grammar_for(ask(tools=json.dumps([{"name": "f", "parameters": schema}])),
                       "hermes") == ("", "")


REAL_PATTERNS = [
    "^[a-zA-Z0-9._%+-]+@[a-zA-Z0-9.-]+[.][a-zA-Z]{2,}$",
    "^([0-9]{1,3}[.]){3}[0-9]{1,3}$",
    "^[a-z0-9-]{1,63}([.][a-z0-9-]{1,63})*$",
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
    "^(https?://)?[a-z0-9.-]+(/[^ ]*)?$",
    "^#[0-9a-fA-F]{6}$",
    "^[A-Z][a-z]+( [A-Z][a-z]+)*$",
    "^[+]?[0-9]{10,15}$",
    "^[^@]+@[^@]+$",
    "^.*[.]json$",
    "^((a{1000}){1000}){1000}$",  # deep but deterministic: one reading, a small grammar
    "^(mon|tues|wednes|thurs|fri|satur|sun)day$",
]


def home_assistant_tools() -> list[str]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "replay", "fixtures",
                                              "homeassistant-*tools*-1.json"))):
        with open(path) as f:
            out.append(tools_of(json.load(f)["body"])[0])
    return out


def test_real_schemas_make_grammars_and_the_estimate_bounds_each():
    schemas = [pattern(p) for p in REAL_PATTERNS] + [
        {"type": "array", "minItems": 1000, "items": {"type": "string"}},
        {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                          for i in range(MAX_PROPERTIES)}},
        {"enum": [f"value-{i}" for i in range(MAX_ENUM)]},
        nested(MAX_DEPTH // 2 - 1),
        {"type": "string", "format": "date-time"},
        # Names that collide once made rule names: each still gets its own rule.
        {"type": "object", "properties": {f"a{c}": {"const": c} for c in "!@#$%^&*()"},
         "required": [f"a{c}" for c in "!@#$%^&*()"]},
        # A recursive schema (a tree) is fine: its rule refers to itself.
        {"type": "object", "properties": {"tree": {"$ref": "#/$defs/node"}},
         "$defs": {"node": {"type": "object", "properties": {
             "name": {"type": "string"}, "children": {"type": "array",
                                                      "items": {"$ref": "#/$defs/node"}}}}}},
    ]
    for schema in schemas:
        grammar, _ = grammar_for(ask(format=json.dumps(schema)), "hermes")
        assert "\nroot ::= " in "\n" + grammar
        assert len(grammar) <= check_schema(schema), json.dumps(schema)[:80]
    collided = grammar_for(ask(format=json.dumps(schemas[-2])), "hermes")[0]
    assert all(f'"\\"{c}\\""' in collided for c in "!@#%^&*()")
    tool_lists = home_assistant_tools()
    assert len(tool_lists) == 6  # 30, 60 and 100 tools, twice
    for tools in tool_lists:
        grammar, _ = grammar_for(ask(tools=tools, tool_choice="required"), "hermes")
        assert "HassTurnOn" in grammar


def test_ref_cycles_and_dangling_refs_are_clear_refusals():
    for schema in ({"$ref": "#"}, {"$ref": "#/$defs/a", "$defs": {
            "a": {"$ref": "#/$defs/b"}, "b": {"$ref": "#/$defs/a"}}},
            {"$ref": "#/$defs/nowhere"}):
        with pytest.raises(BadRequest, match="response_format"):
            grammar_for(ask(format=json.dumps(schema)), "hermes")


def test_check_schema_names_every_bound_it_enforces():
    # The bounds are public and each message names the number it enforces.
    for schema, bound in (({"enum": list(range(MAX_ENUM + 1))}, MAX_ENUM),
                          (nested(MAX_DEPTH + 1), MAX_DEPTH),
                          ({"anyOf": [{}] * (MAX_NODES + 1)}, MAX_NODES)):
        with pytest.raises(SchemaError, match=str(bound)):
            check_schema(schema)
