"""Recognising conversations by their message history."""

from __future__ import annotations

from pichat.protocol import ChatMessage, SessionId
from pichat.router.policy.prefix import Match, PrefixIndex, chain, state

SYS = ChatMessage("system", "You are helpful.")


def u(text: str) -> ChatMessage:
    return ChatMessage("user", text)


def a(text: str) -> ChatMessage:
    return ChatMessage("assistant", text)


def test_the_chain_identifies_each_prefix():
    h = chain([SYS, u("hi"), a("hello")])
    assert len(h) == 3 and len(set(h)) == 3
    assert chain([SYS, u("hi")]) == h[:2]
    assert chain([SYS, u("hi!")])[1] != h[1]
    # Role and content are separated: ("user", "x") differs from ("use", "rx").
    assert chain([ChatMessage("user", "x")]) != chain([ChatMessage("tool", "x")])


def test_a_next_turn_is_recognised_as_the_same_conversation():
    index = PrefixIndex()
    index.record([SYS, u("hi")], "hello", SessionId("s1"))
    assert index.lookup([SYS, u("hi"), a("hello"), u("how are you?")]) == Match(
        session=SessionId("s1"), depth=3)
    index.record([SYS, u("hi"), a("hello"), u("how are you?")], "fine", SessionId("s1"))
    assert index.lookup([SYS, u("hi"), a("hello"), u("how are you?"), a("fine"), u("bye")]
                        ).session == "s1"


def test_a_new_conversation_with_the_same_system_prompt_only_shares_a_prefix():
    index = PrefixIndex()
    index.record([SYS, u("hi")], "hello", SessionId("s1"))
    match = index.lookup([SYS, u("something else")])
    assert match == Match(shared=SessionId("s1"), depth=1)


def test_the_answer_must_match_to_continue():
    index = PrefixIndex()
    index.record([SYS, u("hi")], "hello", SessionId("s1"))
    # The client edited the answer: not the recorded state, only the shared prefix.
    match = index.lookup([SYS, u("hi"), a("HELLO"), u("next")])
    assert match.session is None and match.shared == "s1" and match.depth == 2


def test_the_request_itself_is_never_its_own_prefix():
    index = PrefixIndex()
    index.record([u("hi")], "hello", SessionId("s1"))
    assert index.lookup([u("hi"), a("hello")]).session is None


def test_nothing_known_is_no_match():
    assert PrefixIndex().lookup([SYS, u("hi")]) == Match()


def test_a_regenerated_turn_continues_the_older_state():
    index = PrefixIndex()
    index.record([u("q1")], "a1", SessionId("s1"))
    index.record([u("q1"), a("a1"), u("q2")], "a2", SessionId("s1"))
    # The user went back and asked something else after a1: still conversation s1.
    assert index.lookup([u("q1"), a("a1"), u("q2 edited")]).session == "s1"


def test_the_index_is_bounded_least_recently_used_first():
    index = PrefixIndex(max_entries=4)
    index.record([u("old")], "x", SessionId("old"))      # 2 entries
    index.record([u("new")], "y", SessionId("new"))      # 4 entries
    index.lookup([u("old"), a("x"), u("again")])         # touches old's state
    index.record([u("newest")], "z", SessionId("n3"))    # 6 -> 4 entries
    assert len(index) == 4
    assert index.lookup([u("old"), a("x"), u("more")]).session == "old"   # touched: kept
    assert index.lookup([u("new"), a("y"), u("more")]).session == "new"
    assert index.lookup([u("new"), u("other")]) == Match()  # its prefix entry was oldest


TOOLS = '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]'


def test_tools_seed_the_chain_and_are_a_prefix_of_their_own():
    assert chain([u("hi")], TOOLS) != chain([u("hi")])
    assert chain([u("hi")], TOOLS) != chain([u("hi")], TOOLS.replace("weather", "time"))
    index = PrefixIndex()
    index.record([u("hi")], "hello", SessionId("s1"), TOOLS)
    # The next turn with the same tools is the same conversation; with other tools (its
    # prompt starts otherwise) it is not.
    assert index.lookup([u("hi"), a("hello"), u("more")], TOOLS).session == "s1"
    assert index.lookup([u("hi"), a("hello"), u("more")]) == Match()
    # A new conversation with the same tools shares them (and nothing else).
    assert index.lookup([u("other")], TOOLS) == Match(shared=SessionId("s1"), depth=0)
    assert index.lookup([u("other")], TOOLS.replace("weather", "time")) == Match()
    # A shared message prefix beats the tools alone.
    index.record([SYS, u("x")], "y", SessionId("s2"), TOOLS)
    assert index.lookup([SYS, u("z")], TOOLS) == Match(shared=SessionId("s2"), depth=1)


def test_a_state_another_router_saw_is_the_one_a_record_keeps():
    """A worker reports `state(messages, answer, tools)` of a turn it answered through
    another router; remembered, it makes the next turn that conversation's, as a record
    would, and only with the same answer and tools."""
    asked, tools = [u("hi")], '[{"name": "f"}]'
    recorded, reported = PrefixIndex(), PrefixIndex()
    recorded.record(asked, "hello", SessionId("o~s1"), tools)
    reported.remember(state(asked, "hello", tools), SessionId("o~s1"))
    nxt = [*asked, a("hello"), u("and?")]
    for index in (recorded, reported):
        assert index.lookup(nxt, tools) == Match(session=SessionId("o~s1"), depth=2)
    assert reported.lookup([*asked, a("hullo"), u("and?")], tools).session is None
    assert reported.lookup(nxt).session is None
