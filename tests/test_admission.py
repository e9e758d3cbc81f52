"""Admission as a table: whether the router takes a request, and as what (its session, its
owner's tag, a preferred prefix). Each case: the conversations answered before (owner,
messages, answer, the session they got), then a request and what admission must make of
it."""

from __future__ import annotations

import pytest

from pichat.errors import ErrorCode
from pichat.protocol import ChatMessage, Request, RequestId, SessionId
from pichat.router.policy.admission import Admitted, Refused, admit
from pichat.router.policy.identity import owner_tag, scoped_session
from pichat.router.policy.prefix import PrefixIndex

S = ChatMessage("system", "you are helpful")
Q1, A1 = ChatMessage("user", "hello"), ChatMessage("assistant", "hi there")
Q2 = ChatMessage("user", "and now?")


def req(*messages: ChatMessage, session: str | None = None, rid: str = "r9") -> Request:
    return Request(RequestId(rid), messages, session=SessionId(session) if session else None)


CASES = {
    "a session id is scoped to its owner": (
        [], ("ann", req(Q1, session="s1")),
        {"session": scoped_session("ann", "s1"), "continued": False, "shared": None}),
    "the same id of another owner is another session": (
        [], ("bob", req(Q1, session="s1")),
        {"session": scoped_session("bob", "s1")}),
    "no session: a new one of its own": (
        [], ("ann", req(Q1)),
        {"session": scoped_session("ann", "auto-r9"), "continued": False, "shared": None}),
    "a stateless client's next turn continues its conversation": (
        [("ann", [S, Q1], "hi there", "auto-r1")], ("ann", req(S, Q1, A1, Q2)),
        {"session": scoped_session("ann", "auto-r1"), "continued": True}),
    "another owner's identical history is not its conversation, only a shared prefix": (
        [("ann", [S, Q1], "hi there", "auto-r1")], ("bob", req(S, Q1, A1, Q2)),
        {"session": scoped_session("bob", "auto-r9"), "continued": False,
         "shared": scoped_session("ann", "auto-r1")}),
    "a common system prompt names the session that holds it": (
        [("ann", [S, Q1], "hi there", "auto-r1")], ("bob", req(S, ChatMessage("user", "x"))),
        {"session": scoped_session("bob", "auto-r9"),
         "shared": scoped_session("ann", "auto-r1")}),
    "a client's own session id wins over the prefix index": (
        [("ann", [S, Q1], "hi there", "auto-r1")], ("ann", req(S, Q1, A1, Q2, session="mine")),
        {"session": scoped_session("ann", "mine"), "continued": False}),
}


@pytest.mark.parametrize("name", CASES)
def test_admission(name):
    history, (owner, request), expected = CASES[name]
    prefixes = PrefixIndex()
    for who, messages, answer, session in history:
        prefixes.record(messages, answer, scoped_session(who, session))
    result = admit(request, owner, prefixes=prefixes, isolate=False,
                   max_prompt_chars=10_000, max_message_bytes=1 << 20)
    assert isinstance(result, Admitted)
    assert result.request.owner == owner_tag(owner)
    assert result.request.lease is None
    for key, value in expected.items():
        got = result.request.session if key == "session" else getattr(result, key)
        assert got == value, f"{name}: {key}"


@pytest.mark.parametrize("limits, reason", [
    ({"max_prompt_chars": 4}, "prompt_too_large"),
    ({"max_message_bytes": 300}, "too_large"),
])
def test_requests_too_large_are_refused_with_the_reason(limits, reason):
    settings = {"max_prompt_chars": 10_000, "max_message_bytes": 1 << 20, **limits}
    result = admit(req(ChatMessage("user", "a long question " * 10)), "ann", prefixes=None,
                   isolate=False, **settings)
    assert isinstance(result, Refused)
    assert result.reason == reason and result.code is ErrorCode.BAD_REQUEST


def test_without_a_prefix_index_no_session_is_made_up_and_isolation_is_passed_on():
    result = admit(req(Q1), "ann", prefixes=None, isolate=True, max_prompt_chars=100,
                   max_message_bytes=1 << 20)
    assert isinstance(result, Admitted)
    assert result.request.session is None and result.request.isolate


def test_a_request_a_worker_would_refuse_to_decode_is_refused_naming_the_limit():
    from pichat.protocol import MAX_MESSAGES, MAX_NAME_CHARS
    for request, limit in (
            (req(*[ChatMessage("user", "q")] * (MAX_MESSAGES + 1)), f"1 to {MAX_MESSAGES}"),
            (Request(RequestId("r"), (Q1,), tool_choice="x" * (MAX_NAME_CHARS + 17)),
             "tool_choice")):
        result = admit(request, "ann", prefixes=None, isolate=False,
                       max_prompt_chars=1 << 20, max_message_bytes=1 << 22)
        assert isinstance(result, Refused) and result.reason == "invalid"
        assert result.code is ErrorCode.BAD_REQUEST and limit in result.message
