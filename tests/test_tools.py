"""Tool calling and structured output through the official `openai` client, against real
router and worker processes on the default model; the router's side of them as pure
functions (pichat/router/api/tools.py)."""

from __future__ import annotations

import json
import re

import aiohttp
import openai
import pytest

from conftest import Cluster
from pichat.router.api.tools import Spotter, extract

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city's name"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


# --- reading calls out of answers (pure) -------------------------------------------------

@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     "", [("get_weather", {"city": "Paris"})]),
    ('Let me look.\n<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
     '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>',
     "Let me look.", [("a", {}), ("b", {"x": 1})]),
    ('{"name": "get_time", "parameters": {"city": "Oslo"}}', "",
     [("get_time", {"city": "Oslo"})]),
    ('<|python_tag|>{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"y": 2}}',
     "", [("a", {}), ("b", {"y": 2})]),
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Par', None, []),  # cut off
    ('```json\n{"name": "get_time", "arguments": {"city": "Oslo"}}\n```', "",
     [("get_time", {"city": "Oslo"})]),  # in a Markdown code block, as small models write
    ('<response>\n    {"name": "get_time", "arguments": {"city": "Oslo"}}\n</response>', "",
     [("get_time", {"city": "Oslo"})]),  # in a tag of its own (the default model, seed 1)
    ('<b>{"name": "get_time", "arguments": {}}</i>', None, []),  # tags that do not match
    ('<p>{"answer": 1}</p>', None, []),
    ('```python\nprint(1)\n```', None, []),
    ('{"answer": 42}', None, []),  # JSON, but not a call
    ("Just text, with a { brace.", None, []),
    ('{"name": "say_hello", "arguments": {}}', None, []),  # no such function
])
def test_calls_are_read_in_each_family_and_anything_else_stays_text(text, content, calls):
    got_content, got = extract(text, frozenset(("get_weather", "get_time", "a", "b")))
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls
    assert got_content == (text if content is None else content)
    assert len({c.id for c in got}) == len(got)


@pytest.mark.parametrize("pieces,sent,calls", [
    (["Hello", " there, ", "<tool", "_call>{\"name\": \"a\", \"arguments\": {}}</tool_call>"],
     "Hello there, ", ["a"]),
    (["  ", "{\"name\": \"a\",", " \"parameters\": {}}"], "", ["a"]),
    (["Plain ", "text <to", "day> is fine"], "Plain text <today> is fine", []),
    (["<tool_call>", "not json at all"], "<tool_call>not json at all", []),
    (["``", "`json\n{\"name\": \"a\",", " \"arguments\": {}}\n```"], "", ["a"]),
    (["``", "`python\nx = 1\n```"], "```python\nx = 1\n```", []),
    (["<resp", "onse>\n", "  {\"name\": \"a\", \"arguments\": {}}\n</response>"], "", ["a"]),
    (["<b>bold</b> and ", "more"], "<b>bold</b> and more", []),
    (["<", "br> then text"], "<br> then text", []),
])
def test_a_streamed_answer_holds_back_only_what_may_be_a_call(pieces, sent, calls):
    spotter = Spotter(frozenset(("a",)))
    out = "".join(spotter.feed(p) for p in pieces)
    rest, found = spotter.finish()
    assert (out + rest).strip() == sent.strip()
    assert [c.name for c in found] == calls


# --- the default model through the openai client ---------------------------------------

def client(base: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0,
                              timeout=120)


@pytest.fixture
async def qwen(cluster: Cluster, default_model) -> openai.AsyncOpenAI:
    cluster.router()
    cluster.worker("w1", "--model", str(default_model), "--ctx", "2048", "--threads", "2",
                   backend="llama")
    await cluster.wait_workers(1, timeout=300)
    async with client(cluster.http_url) as c:
        yield c


@pytest.mark.slow
async def test_a_tool_round_trip_with_the_openai_client(qwen, cluster: Cluster):
    question = [{"role": "system", "content": "You are a helpful assistant. When a tool has "
                 "answered, tell the user the answer in one sentence."},
                {"role": "user", "content": "What is the weather like in Paris right now?"}]
    first = await qwen.chat.completions.create(
        model="pichat", messages=question, tools=[WEATHER, TIME], temperature=0,
        tool_choice="required", max_tokens=64)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name in ("get_weather", "get_time")
    arguments = json.loads(call.function.arguments)  # the grammar: always a valid call
    assert "paris" in arguments["city"].lower()
    # The result goes back as a tool message; the model answers from it.
    second = await qwen.chat.completions.create(
        model="pichat", temperature=0, max_tokens=64, tools=[WEATHER, TIME], tool_choice="none",
        messages=[*question, choice.message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id,
                   "content": json.dumps({"city": "Paris", "temperature_c": 18,
                                          "sky": "sunny"})}])
    answer = second.choices[0].message.content
    assert second.choices[0].finish_reason == "stop" and "18" in answer, answer
    async with aiohttp.ClientSession() as http:  # and /metrics counted them
        async with http.get(f"{cluster.http_url}/metrics") as r:
            metrics = await r.text()
    events = dict(re.findall(r'pichat_events_total\{event="(\w+)"\} ([\d.]+)', metrics))
    # (the second asked for tool_choice none: its tools are not shown to the model)
    assert float(events["tool_calls"]) >= 1 and float(events["tool_requests"]) == 1, events


@pytest.mark.slow
async def test_tool_calls_stream_in_openais_delta_shape(qwen):
    stream = await qwen.chat.completions.create(
        model="pichat", stream=True, temperature=0, max_tokens=64, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        messages=[{"role": "user", "content": "What time is it in Tokyo?"}])
    calls: dict[int, dict] = {}
    finish = None
    async for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        for d in delta.tool_calls or []:
            entry = calls.setdefault(d.index, {"name": "", "arguments": "", "id": None})
            entry["id"] = entry["id"] or d.id
            entry["name"] += d.function.name or ""
            entry["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["get_time"]  # the named one
    assert calls[0]["id"] and "tokyo" in json.loads(calls[0]["arguments"])["city"].lower()


@pytest.mark.slow
async def test_a_json_schema_answer_always_parses_and_matches(qwen):
    schema = {"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer"},
        "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 3}},
        "required": ["name", "age", "languages"], "additionalProperties": False}
    reply = await qwen.chat.completions.create(
        model="pichat", temperature=0, max_tokens=128,
        response_format={"type": "json_schema",
                         "json_schema": {"name": "person", "schema": schema}},
        messages=[{"role": "user", "content": "Invent a programmer and describe them."}])
    person = json.loads(reply.choices[0].message.content)
    assert set(person) == {"name", "age", "languages"}
    assert isinstance(person["age"], int) and isinstance(person["name"], str)
    assert all(isinstance(x, str) for x in person["languages"]) and len(person["languages"]) <= 3
    free = await qwen.chat.completions.create(
        model="pichat", temperature=0, max_tokens=48, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give me a JSON object with two colours."}])
    assert isinstance(json.loads(free.choices[0].message.content), dict)


async def test_bad_tools_and_formats_are_400s_and_the_router_serves_on(cluster: Cluster,
                                                                       tiny_model):
    cluster.router()
    cluster.worker("w1", "--model", str(tiny_model), "--ctx", "512", backend="llama")
    await cluster.wait_workers(1)
    user = [{"role": "user", "content": "hi"}]
    async with client(cluster.http_url) as c:
        cases = [
            ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]},
             "tools[0].function.name"),
            ({"tools": "get_weather"}, "tools"),
            ({"tools": [WEATHER], "tool_choice": {"type": "function",
                                                  "function": {"name": "nope"}}},
             "tool_choice"),
            ({"messages": [*user, {"role": "tool", "tool_call_id": "call_x",
                                   "content": "42"}]}, "messages[1].tool_call_id"),
            ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}},
             "response_format"),
            ({"response_format": {"type": "yaml"}}, "response_format"),
            ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
                "type": "string", "pattern": "^a{30000000}$"}}}}, "response_format"),
        ]
        for extra, param in cases:
            body = {"model": "pichat", "messages": user, "max_tokens": 4, **extra}
            with pytest.raises(openai.BadRequestError) as info:
                await c.chat.completions.create(**body)
            assert info.value.body["param"] == param, extra
        # A schema the converter cannot enforce: the worker says which part, as a 400.
        with pytest.raises(openai.BadRequestError, match="cannot be enforced.*remote schemas"):
            await c.chat.completions.create(
                model="pichat", messages=user, max_tokens=4, response_format={
                    "type": "json_schema", "json_schema": {"name": "x", "schema": {
                        "type": "object", "properties": {"a": {"$ref": "https://x/y"}}}}})
        # A bomb in a tool's parameters with a call required: the worker refuses it as it
        # would make the grammar, before any expansion.
        with pytest.raises(openai.BadRequestError, match="tools: pattern.*more than one way"):
            await c.chat.completions.create(
                model="pichat", messages=user, max_tokens=4, tool_choice="required", tools=[{
                    "type": "function", "function": {"name": "f", "parameters": {
                        "type": "object", "properties": {"a": {
                            "type": "string", "pattern": "^(.+)+$"}}}}}])
        reply = await c.chat.completions.create(model="pichat", messages=user, max_tokens=4,
                                                temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
async def test_with_tool_choice_auto_calls_are_made_and_always_name_a_real_function(qwen):
    asked = await qwen.chat.completions.create(
        model="pichat", temperature=0, max_tokens=64, tools=[WEATHER, TIME],
        messages=[{"role": "user", "content": "What is the weather like in Paris right now?"}])
    call = asked.choices[0].message.tool_calls[0]
    assert asked.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"].lower().startswith("paris")
    # Asked something no tool does, this small model still reaches for one (it wrote
    # {"name": "hello", ...} unconstrained): from its call's start the grammar holds it
    # to a function that exists, with arguments its schema allows.
    chat = await qwen.chat.completions.create(
        model="pichat", temperature=0, max_tokens=48, tools=[WEATHER, TIME], stream=True,
        messages=[{"role": "user", "content": "Say hello to me in French."}])
    text, calls, finish = "", [], None
    async for chunk in chat:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            calls += chunk.choices[0].delta.tool_calls or []
            finish = chunk.choices[0].finish_reason or finish
    assert text.strip() or calls
    for c in calls:
        assert c.function.name in ("get_weather", "get_time") and finish == "tool_calls"
        assert isinstance(json.loads(c.function.arguments)["city"], str)


@pytest.mark.slow
async def test_langchain_binds_tools_and_gets_structured_output(qwen, cluster: Cluster):
    import httpx
    from langchain_openai import ChatOpenAI

    async with httpx.AsyncClient(timeout=120) as http:  # closed here, not at exit
        llm = ChatOpenAI(base_url=f"{cluster.http_url}/v1", api_key="none", model="pichat",
                         temperature=0, max_tokens=96, max_retries=0, http_async_client=http)
        await langchain_round(llm)


async def langchain_round(llm) -> None:
    from pydantic import BaseModel, Field

    class GetWeather(BaseModel):
        """The current weather in a city."""

        city: str = Field(description="The city's name")

    called = await llm.bind_tools([GetWeather], tool_choice="GetWeather").ainvoke(
        "What is the weather like in Madrid?")
    (call,) = called.tool_calls
    assert call["name"] == "GetWeather" and "madrid" in call["args"]["city"].lower()

    class Person(BaseModel):
        """A person."""

        name: str
        age: int

    person = await llm.with_structured_output(Person, method="json_schema").ainvoke(
        "Invent a person called Ana who is 31 years old.")
    assert isinstance(person, Person) and isinstance(person.age, int) and person.name


# --- the worker's side (pure) ------------------------------------------------------------

def test_template_families_and_the_generic_format_for_templates_without_tools():
    from pichat.protocol import ChatMessage
    from pichat.worker.engine.tools import family_of, template_messages, template_tools

    assert family_of("{% if tools %}<tool_call>{% endif %}") == "hermes"
    assert family_of("<|python_tag|>{{ x }}") == "llama3"
    assert family_of("{% for m in messages %}{{ m.content }}{% endfor %}") == "generic"
    functions = template_tools(json.dumps([WEATHER["function"]]))
    call = json.dumps([{"id": "call_1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}])
    messages = [ChatMessage("user", "Weather in Oslo?"), ChatMessage("assistant", "", call),
                ChatMessage("tool", "cold", tool_call_id="call_1")]
    native = template_messages(messages, functions, "hermes")
    assert native[1]["tool_calls"][0]["function"] == {"name": "get_weather",
                                                      "arguments": {"city": "Oslo"}}
    assert native[2] == {"role": "tool", "content": "cold", "tool_call_id": "call_1"}
    generic = template_messages(messages, functions, "generic")
    assert generic[0]["role"] == "system" and "get_weather" in generic[0]["content"]
    assert "<tool_call>" in generic[2]["content"]  # the call, as the model would write it
    assert generic[3] == {"role": "user", "content": "<tool_response>\ncold\n</tool_response>"}


def test_grammars_for_calls_and_formats_and_what_cannot_be_enforced():
    from pichat.errors import BadRequest
    from pichat.protocol import ChatMessage, Request, RequestId
    from pichat.worker.engine.tools import TRIGGERS, grammar_for

    tools = json.dumps([WEATHER["function"], TIME["function"]])
    ask = lambda **kw: Request(RequestId("r"), (ChatMessage("user", "x"),), **kw)  # noqa: E731
    assert grammar_for(ask(), "hermes") == ("", "")
    forced, trigger = grammar_for(ask(tools=tools, tool_choice="required"), "hermes")
    assert trigger == "" and forced.startswith('root ::= "<tool_call>\\n" call')
    assert '"\\"get_weather\\""' in forced and '"\\"get_time\\""' in forced
    named, _ = grammar_for(ask(tools=tools, tool_choice="function:get_time"), "llama3")
    assert "get_time" in named and "get_weather" not in named and "parameters" in named
    lazy, trigger = grammar_for(ask(tools=tools), "hermes")
    assert trigger.split("\n") == list(TRIGGERS) and " | call" in lazy.splitlines()[0]
    assert grammar_for(ask(tools=tools, tool_choice="none"), "hermes") == ("", "")
    assert "root" in grammar_for(ask(format="json"), "hermes")[0]
    for request, message in (
            (ask(tool_choice="required"), "no tools"),
            (ask(tools=tools, tool_choice="function:nope"), "not among the tools"),
            (ask(format='{"type": "string", "pattern": "a+"}'), "cannot be enforced"),
            (ask(format=json.dumps({"type": "array", "minItems": 10**8,
                                    "items": {"type": "string"}})), "minItems"),
            (ask(format=json.dumps({"type": "object", "properties": {
                f"p{i}": {"type": "string", "maxLength": 1000} for i in range(40)}})),
             "characters of grammar")):
        with pytest.raises(BadRequest, match=message):
            grammar_for(request, "hermes")


def test_typeless_parameters_are_any_value_and_the_deepest_schemas_a_clear_refusal():
    """Home Assistant writes a parameter of any type as {"description": ...}: the call
    grammar takes it as any value. A schema nested as deep as JSON can carry is a 400
    with tool_choice required and no grammar with auto, never a crash of the slot."""
    from pichat.errors import BadRequest
    from pichat.protocol import ChatMessage, Request, RequestId
    from pichat.worker.engine.tools import grammar_for, template_tools

    ask = lambda **kw: Request(RequestId("r"), (ChatMessage("user", "x"),), **kw)  # noqa: E731
    typeless = json.dumps([{"name": "HassTurnOn", "description": "on", "parameters": {
        "type": "object", "properties": {"domain": {"description": "one or a list"}}}}])
    grammar, _ = grammar_for(ask(tools=typeless, tool_choice="required"), "hermes")
    assert "HassTurnOn" in grammar
    schema: dict = {"type": "string"}
    depths = 0
    for depth in range(600):  # every depth this interpreter's json still writes
        schema = {"type": "object", "properties": {"a": schema}}
        try:
            deep = json.dumps([{"name": "deep", "parameters": schema}])
        except RecursionError:
            break
        if depth < 400:
            continue
        depths += 1
        for call, argument in ((grammar_for, ask(tools=deep, tool_choice="required")),
                               (grammar_for, ask(tools=deep)),
                               (template_tools, deep)):
            try:
                call(argument, "hermes") if call is grammar_for else call(argument, True)
            except BadRequest as exc:
                assert "nested" in str(exc) or "characters of grammar" in str(exc)
    assert depths > 10
