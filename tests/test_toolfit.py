"""pichat/worker/engine/toolfit.py: tools compacted for the prompt, ranked, chosen to fit, and a
conversation's choice kept while it serves. The sim model counts tokens (a word a token)
and embeds (hashed bag of words), so these run without a model; the real model's replays
are in tests/test_replay.py."""

from __future__ import annotations

import json

import pytest

from pichat.config import SimConfig
from pichat.protocol import ChatMessage
from pichat.worker.engine.sim import SimModel
from pichat.worker.engine.toolfit import Fitter, choose, prompt_form, query_of, relevance, tool_text


def fn(name: str, description: str, **props: str) -> dict:
    return {"name": name, "description": description,
            "parameters": {"type": "object", "title": name, "additionalProperties": False,
                           "required": [],
                           "properties": {k: {"type": "string", "title": k, "description": v}
                                          for k, v in props.items()}}}


@pytest.mark.parametrize("scores, costs, budget, first, kept", [
    ([0.1, 0.9, 0.5], [10, 10, 10], 30, [], [0, 1, 2]),      # all fit: all kept
    ([0.1, 0.9, 0.5], [10, 10, 10], 20, [], [1, 2]),         # the two most relevant
    ([0.1, 0.9, 0.5], [10, 10, 10], 25, [0], [0, 1]),        # `first` before any score
    ([0.9, 0.8, 0.1], [30, 10, 10], 25, [], [1, 2]),         # too big: smaller ones after it
    ([0.5, 0.5, 0.5], [10, 10, 10], 20, [], [0, 1]),         # ties: the request's order
    ([0.9, 0.1], [10, 10], 5, [], []),                       # none fits
])
def test_choose(scores, costs, budget, first, kept):
    assert choose(scores, costs, budget, first) == kept


def test_prompt_form_drops_what_says_nothing_and_keeps_what_matters():
    f = fn("set_light", "Turns   a\n\nlight on.", brightness="0 to 100", title="the label")
    form = prompt_form(f)
    assert form["description"] == "Turns a light on."
    params = form["parameters"]
    assert "title" not in params and "additionalProperties" not in params
    assert "required" not in params
    # a property *named* title stays; only the schema keyword goes
    assert set(params["properties"]) == {"brightness", "title"}
    assert "title" not in params["properties"]["brightness"]
    long = prompt_form(fn("x", "word " * 1000))
    assert len(long["description"]) <= 1024 and long["description"].endswith("…")
    # the request's own dict is untouched (the grammar uses it as sent)
    assert f["parameters"]["additionalProperties"] is False


def test_query_is_the_last_user_message_even_after_tool_results():
    messages = (ChatMessage("system", "s"), ChatMessage("user", "first"),
                ChatMessage("assistant", "a"), ChatMessage("user", "turn on the kitchen light"),
                ChatMessage("tool", "ok"))
    assert query_of(messages) == "turn on the kitchen light"


def test_relevance_ranks_by_words_without_vectors():
    tools = [fn("HassTurnOn", "Turns on a device or entity", device="device name"),
             fn("HassClimateGetTemperature", "Gets the current temperature of a climate"),
             fn("search_notes", "Search the user's notes")]
    scores = relevance(None, [None] * 3, "Turn on the kitchen light",
                       [tool_text(t) for t in tools])
    assert scores.index(max(scores)) == 0
    scores = relevance(None, [None] * 3, "What temperature is it in the living room?",
                       [tool_text(t) for t in tools])
    assert scores.index(max(scores)) == 1


def _fitter(model: SimModel, calls: list | None = None) -> Fitter:
    def embed(texts):
        if calls is not None:
            calls.append(len(texts))
        return model.embed(texts)[0]
    return Fitter(count=lambda m, t: len(model.chat_tokens(m, t)),
                  tokens=lambda text: len(model.text_tokens(text)), embed=embed)


FILLER = " ".join(f"w{i}" for i in range(60))
TOOLS = [fn(f"tool_{i}", f"does thing {i} {FILLER}") for i in range(10)] + \
    [fn("turn_on_light", f"turn on a light in a room {FILLER}", room="the room")]


def sim() -> SimModel:
    return SimModel(SimConfig(prompt_tps=1e9), n_ctx=4096)


def test_fit_keeps_everything_that_fits():
    model = sim()
    messages = (ChatMessage("user", "turn on the light in the kitchen"),)
    tools = json.dumps(TOOLS)
    room = len(model.chat_tokens(messages, tools))
    choice = _fitter(model).fit(messages, tools, room=room)
    assert choice.tools == tools and choice.left_out == ()


def test_fit_keeps_the_most_relevant_and_names_the_rest():
    model = sim()
    messages = (ChatMessage("user", "turn on the light in the kitchen"),)
    tools = json.dumps(TOOLS)
    room = len(model.chat_tokens(messages, "")) + 250  # room for about two tools
    choice = _fitter(model).fit(messages, tools, room=room)
    kept = [f["name"] for f in json.loads(choice.tools)]
    assert "turn_on_light" in kept
    assert set(kept) | set(choice.left_out) == {f["name"] for f in TOOLS}
    assert not set(kept) & set(choice.left_out)
    assert len(model.chat_tokens(messages, choice.tools)) <= room


def test_fit_keeps_a_named_tool_and_tools_already_called():
    model = sim()
    call = json.dumps([{"id": "c1", "name": "tool_7", "arguments": "{}"}])
    messages = (ChatMessage("user", "do thing seven"),
                ChatMessage("assistant", "", tool_calls=call, ),
                ChatMessage("tool", "done", tool_call_id="c1"),
                ChatMessage("user", "turn on the light in the kitchen"))
    room = len(model.chat_tokens(messages, "")) + 300
    choice = _fitter(model).fit(messages, json.dumps(TOOLS), room=room, named="tool_3")
    kept = [f["name"] for f in json.loads(choice.tools)]
    assert "tool_3" in kept and "tool_7" in kept


def test_a_conversation_keeps_its_choice_while_it_serves():
    """The kept tools are the prompt's start: the next turn keeps them (and its KV) when
    they still hold the tool it needs most; a turn needing a left-out tool chooses anew."""
    model = sim()
    fitter = _fitter(model)
    tools = json.dumps(TOOLS)
    turn1 = (ChatMessage("user", "turn on the light in the kitchen"),)
    room = 345  # three tools (75 tokens each) beside the message and a quarter for history
    first = fitter.fit(turn1, tools, room=room, owner="o", session="s")
    assert len(json.loads(first.tools)) == 3
    turn2 = (*turn1, ChatMessage("assistant", "done"),
             ChatMessage("user", "turn on the light in the hall please"))
    again = fitter.fit(turn2, tools, room=room, owner="o", session="s")
    assert again.tools == first.tools
    turn3 = (*turn2, ChatMessage("assistant", "done"),
             ChatMessage("user", "now does thing 4 please, thing 4"))
    changed = fitter.fit(turn3, tools, room=room, owner="o", session="s")
    assert "tool_4" in [f["name"] for f in json.loads(changed.tools)]
    # another session with the same words starts from its own choice, not this one
    other = fitter.fit(turn2, tools, room=room, owner="o", session="t")
    assert "turn_on_light" in [f["name"] for f in json.loads(other.tools)]


def test_tool_vectors_are_embedded_once():
    model = sim()
    calls: list[int] = []
    fitter = _fitter(model, calls)
    messages = (ChatMessage("user", "turn on the light in the kitchen"),)
    room = len(model.chat_tokens(messages, "")) + 200
    fitter.fit(messages, json.dumps(TOOLS), room=room)
    first = sum(calls)
    assert first == len(TOOLS) + 1
    fitter.fit((ChatMessage("user", "turn off the light"),), json.dumps(TOOLS), room=room)
    assert sum(calls) == first + 1  # only the new message
