"""Slots and the KV session store: which conversation lives where, save/restore, LRU."""

from __future__ import annotations

import threading

import pytest

from pichat.config import SimConfig
from pichat.errors import ContextTooLong
from pichat.protocol import ChatMessage, Request, RequestId, Sampling, SessionId
from pichat.worker.engine.backend import SavedState
from pichat.worker.engine.sim import SimModel
from pichat.worker.engine.textstream import TextStream
from pichat.worker.store.slots import SessionStore, SlotManager, message_boundary

FAST = SimConfig(prompt_tps=1e6, gen_tps=1e6, reply_tokens=5, kv_bytes_per_token=100)


def state(n_tokens: int, nbytes: int) -> SavedState:
    return SavedState(tuple(range(n_tokens)), b"", nbytes)


def test_store_drops_least_recently_used_to_stay_in_budget():
    store = SessionStore(budget_bytes=100)
    assert store.put(SessionId("a"), state(1, 40)) == []
    assert store.put(SessionId("b"), state(1, 40)) == []
    assert store.put(SessionId("c"), state(1, 40)) == ["a"]
    assert store.sessions() == ["b", "c"]
    assert store.nbytes == 80
    assert store.take(SessionId("b")) is not None
    assert store.nbytes == 40
    assert store.take(SessionId("b")) is None


def test_store_refuses_a_state_bigger_than_the_budget():
    store = SessionStore(budget_bytes=10)
    assert store.put(SessionId("big"), state(1, 11)) == ["big"]
    assert len(store) == 0 and store.nbytes == 0


def test_store_replacing_a_session_does_not_double_count():
    store = SessionStore(budget_bytes=100)
    store.put(SessionId("a"), state(1, 60))
    store.put(SessionId("a"), state(2, 70))
    assert store.nbytes == 70 and len(store) == 1


class Harness:
    def __init__(self, slots: int = 1, cache_bytes: int = 1 << 20, n_ctx: int = 4096) -> None:
        self.manager = SlotManager(SimModel(FAST, n_ctx), slots, threads=1,
                                   cache_bytes=cache_bytes)
        self.history: dict[str, list[ChatMessage]] = {}

    def turn(self, session: str | None, text: str):
        history = self.history.setdefault(session or "-", [])
        history.append(ChatMessage("user", text))
        request = Request(RequestId(text), tuple(history), Sampling(temperature=0),
                          session=SessionId(session) if session else None)
        slot = self.manager.acquire(request.session)
        assert slot is not None
        out = TextStream(lambda *_: None)
        try:
            result = self.manager.run(slot, request, out, threading.Event())
        finally:
            self.manager.release(slot)
        history.append(ChatMessage("assistant", out.text))
        return slot.index, result


def test_a_returning_session_reuses_everything_but_the_new_turn():
    h = Harness()
    _, first = h.turn("s1", "hello there")
    assert first.cached_tokens == 0
    _, second = h.turn("s1", "and again")
    # Everything up to the end of the first answer is reused.
    assert second.cached_tokens == first.prompt_tokens + first.completion_tokens
    assert second.prompt_tokens - second.cached_tokens == len("and again".split()) + 4


def test_evicted_session_is_saved_and_restored_when_it_returns():
    h = Harness(slots=1)
    _, a1 = h.turn("a", "first question")
    h.turn("b", "another conversation")          # takes the only slot: a is saved
    assert "a" in h.manager.store.sessions()
    _, a2 = h.turn("a", "follow up")              # a comes back: restored, not recomputed
    assert a2.cached_tokens == a1.prompt_tokens + a1.completion_tokens
    assert "a" not in h.manager.store.sessions()  # it lives in the slot again
    assert set(h.manager.warm_sessions()) == {"a", "b"}


def test_without_room_in_the_store_a_session_is_evicted_and_reported():
    h = Harness(slots=1, cache_bytes=1)
    h.turn("a", "first question")
    h.turn("b", "another conversation")
    assert h.manager.take_evicted() == ["a"]
    assert h.manager.take_evicted() == []
    _, a2 = h.turn("a", "follow up")
    assert a2.cached_tokens > 0  # only the shared start ("<user>"...) is reusable
    assert a2.cached_tokens < a2.prompt_tokens - 10


def test_a_session_prefers_its_own_slot():
    h = Harness(slots=2)
    index_a, _ = h.turn("a", "one")
    index_b, _ = h.turn("b", "two")
    assert index_a != index_b
    assert h.turn("a", "three")[0] == index_a
    assert h.turn("b", "four")[0] == index_b


def test_acquire_returns_none_when_all_slots_are_busy():
    h = Harness(slots=2)
    s1 = h.manager.acquire(None)
    s2 = h.manager.acquire(None)
    assert s1 is not None and s2 is not None and s1 is not s2
    assert h.manager.acquire(SessionId("x")) is None
    assert h.manager.busy == 2
    h.manager.release(s1)
    assert h.manager.acquire(SessionId("x")) is s1


def test_prompt_longer_than_the_context_is_refused():
    h = Harness(n_ctx=8)
    with pytest.raises(ContextTooLong, match="context holds 8"):
        h.turn("s", "one two three four five six seven eight nine")


def test_a_plain_prompt_skips_the_chat_template_and_an_empty_one_is_refused():
    from pichat.errors import BadRequest

    h = Harness()
    slot = h.manager.acquire(None)
    out = TextStream(lambda *_: None)
    result = h.manager.run(slot, Request(RequestId("p"), (), Sampling(temperature=0),
                                         prompt="once upon a time"), out, threading.Event())
    assert result.prompt_tokens == 4  # four words, no role markers
    with pytest.raises(BadRequest, match="empty"):
        h.manager.run(slot, Request(RequestId("q"), (), prompt=""), out, threading.Event())


def test_a_continuation_outside_the_vocabulary_is_refused_and_the_slot_still_works():
    from pichat.errors import BadRequest

    h = Harness()
    slot = h.manager.acquire(None)
    out = TextStream(lambda *_: None)
    bad = Request(RequestId("c"), (ChatMessage("user", "hi"),),
                  continuation=(200, h.manager.model.n_vocab))
    with pytest.raises(BadRequest, match="outside the model's vocabulary"):
        h.manager.run(slot, bad, out, threading.Event())
    good = Request(RequestId("d"), (ChatMessage("user", "hi"),), Sampling(temperature=0),
                   continuation=(h.manager.model.n_vocab - 1,))
    assert h.manager.run(slot, good, out, threading.Event()).prompt_tokens == 5


def owned_turn(h: Harness, owner: str, messages: list[ChatMessage], session: str,
               isolate: bool = False):
    slot = h.manager.acquire(SessionId(session))
    out = TextStream(lambda *_: None)
    try:
        return h.manager.run(slot, Request(RequestId(session), tuple(messages),
                                           Sampling(temperature=0), session=SessionId(session),
                                           owner=owner, isolate=isolate),
                             out, threading.Event())
    finally:
        h.manager.release(slot)


SYSTEM = ChatMessage("system", "you are the school helper and you answer in short sentences")
SECRET = ChatMessage("user", "my password is correct horse battery staple")


@pytest.mark.parametrize("guess, isolate, cached", [
    # A guess that shares a partial message: only the whole system prompt is reused
    # (its marker, 11 words, its end: 13 tokens), however many words match after it.
    ("my password is correct horse", False, 13),
    ("my password is", False, 13),
    ("something else entirely", False, 13),
    # The whole message guessed exactly: still the system prompt only (a boundary after
    # it confirmed the guess: 13 + 9 cached tokens instead of 13).
    ("my password is correct horse battery staple", False, 13),
    ("my password is correct horse", True, 0),  # --isolate-cache: nothing across owners
])
def test_another_owners_kv_is_reused_only_up_to_a_message_boundary(guess, isolate, cached):
    h = Harness(slots=1)
    owned_turn(h, "alice", [SYSTEM, SECRET], "a~1")
    result = owned_turn(h, "mallory", [SYSTEM, ChatMessage("user", guess)], "m~1",
                        isolate=isolate)
    assert result.cached_tokens == cached


def test_no_message_of_another_owner_but_the_system_prompt_can_be_confirmed():
    """Whole turns guessed exactly (the user's message and the model's answer), or a
    conversation without a system prompt: cached tokens, evaluated tokens and so the time
    are those of a wrong guess of the same length."""
    alice = [SYSTEM, SECRET, ChatMessage("assistant", "noted"),
             ChatMessage("user", "what is it")]
    for mine, right, wrong in (
            (alice, alice, [SYSTEM, ChatMessage("user", "my password is wrong horse battery "
                                                        "staple"),
                            ChatMessage("assistant", "noted"),
                            ChatMessage("user", "what is it")]),
            ([SECRET], [SECRET], [ChatMessage("user", "my password is wrong horse battery "
                                                      "staple")])):
        usage = {}
        for guess in ("right", "wrong"):
            h = Harness(slots=1)
            owned_turn(h, "alice", mine, "a~1")
            r = owned_turn(h, "mallory", right if guess == "right" else wrong, "m~1")
            usage[guess] = (r.prompt_tokens, r.cached_tokens)
        assert usage["right"] == usage["wrong"], usage
        assert usage["right"][1] == (13 if mine[0] is SYSTEM else 0)


TOOLS = ChatMessage("system", " ".join(f"tool{i} does thing {i}" for i in range(40)))


def test_a_saved_conversations_start_serves_a_new_conversation_that_shares_it():
    """A client that sends one long tool list with each chat, and a title task between
    two chats (which takes the only slot): the next chat reads only what follows the tool
    list, copied from the first chat's saved state, which itself stays saved."""
    h = Harness(slots=1)
    first = owned_turn(h, "alice", [TOOLS, ChatMessage("user", "hello")], "a~1")
    owned_turn(h, "alice", [ChatMessage("user", "title this chat")], "a~2")
    assert "a~1" in h.manager.store.sessions()
    second = owned_turn(h, "alice", [TOOLS, ChatMessage("user", "what is two and two")],
                        "a~3")
    assert second.cached_tokens == 1 + 160 + 1 + 1  # the tool list and the user marker
    assert {"a~1", "a~2"} <= set(h.manager.store.sessions())
    # The first chat's own state was lent, not taken: it goes on warm.
    again = owned_turn(h, "alice", [TOOLS, ChatMessage("user", "hello"),
                                    ChatMessage("assistant", "x"),
                                    ChatMessage("user", "more")], "a~1")
    assert again.cached_tokens >= first.prompt_tokens


@pytest.mark.parametrize("isolate, cached", [(False, 1 + 160 + 1), (True, 0)])
def test_another_owners_saved_state_lends_the_system_prompt_only(isolate, cached):
    h = Harness(slots=1)
    owned_turn(h, "alice", [TOOLS, SECRET], "a~1")
    owned_turn(h, "bob", [ChatMessage("user", "something else")], "b~1")
    result = owned_turn(h, "mallory", [TOOLS, ChatMessage("user", "my password is")],
                        "m~1", isolate=isolate)
    assert result.cached_tokens == cached


def test_the_same_owners_kv_is_reused_token_for_token():
    h = Harness(slots=1)
    owned_turn(h, "alice", [SYSTEM, SECRET], "a~1")
    result = owned_turn(h, "alice", [SYSTEM, ChatMessage("user", "my password is correct")],
                        "a~2")
    assert result.cached_tokens == 13 + 1 + 4  # system, the user marker, four equal words


def test_another_conversations_cells_are_never_spliced_in():
    """Two requests of one owner whose prompts share a long run after different starts
    (one tool schema with its keys in another order, then the same question): the run's
    cells may be moved into place only for the conversation that read them (its start
    slid out), never for another one, which gets the common start and reads the rest."""
    h = Harness(slots=1)
    shared = " ".join(f"k{i}" for i in range(48))
    first = owned_turn(h, "alice", [SYSTEM, ChatMessage("user", "type required " + shared)],
                       "a~1")
    assert first.cached_tokens == 0
    other = owned_turn(h, "alice", [SYSTEM, ChatMessage("user", "required type " + shared)],
                       "a~2")
    assert other.cached_tokens == 13 + 1  # the system prompt and the user marker only
    # The same conversation whose start changed still moves its own cells.
    again = owned_turn(h, "alice", [SYSTEM, ChatMessage("user", "type type " + shared)],
                       "a~2")
    assert again.cached_tokens > 13 + 1 + 48


def test_a_saved_state_keeps_its_owner():
    h = Harness(slots=1)
    owned_turn(h, "alice", [SYSTEM, SECRET], "a~1")
    owned_turn(h, "bob", [ChatMessage("user", "hello")], "b~1")  # alice's state is saved
    owned_turn(h, "alice", [SYSTEM, SECRET, ChatMessage("assistant", "x"),
                            ChatMessage("user", "and")], "a~1")  # restored: hers again
    result = owned_turn(h, "mallory", [SYSTEM, ChatMessage("user", "my password")], "m~1")
    assert result.cached_tokens == 13


def test_message_boundary_finds_the_longest_run_of_whole_messages():
    model = SimModel(FAST, 4096)
    messages = [SYSTEM, SECRET]
    prompt = model.chat_tokens(messages)
    assert message_boundary(model, messages, prompt, len(prompt)) == 13 + 9
    assert message_boundary(model, messages, prompt, 13 + 8) == 13
    assert message_boundary(model, messages, prompt, 12) == 0


def sliding_turns(manager: SlotManager, turns: int, *, session: str | None = "s",
                  memory: str | None = None, remembered: int = 0):
    """A conversation of `turns` turns of ~25 words through `manager`; each turn's result
    (the history sent in full each time, as a stateless client does)."""
    history = [ChatMessage("system", "You are terse.")]
    results = []
    for t in range(turns):
        history.append(ChatMessage("user", f"q{t} " + "w " * 20))
        slot = manager.acquire(SessionId(session) if session else None)
        out = TextStream(lambda *_: None)
        try:
            results.append(manager.run(slot, Request(
                RequestId(f"r{t}"), tuple(history), Sampling(temperature=0, max_tokens=5),
                session=SessionId(session) if session else None, owner="o", memory=memory,
                remembered=remembered), out, threading.Event()))
        finally:
            manager.release(slot)
        out.close()
        history.append(ChatMessage("assistant", out.text))
    return results


def test_a_note_is_written_once_per_slide_and_kept_between_slides():
    manager = SlotManager(SimModel(FAST, 512), 1, threads=1, cache_bytes=1 << 20)
    results = sliding_turns(manager, 40)
    slides = [i for i, (a, b) in enumerate(zip(results, results[1:]), 1)
              if b.dropped_tokens != a.dropped_tokens]
    notes = [i for i, r in enumerate(results) if r.note is not None]
    assert slides and notes == slides  # a new note exactly when the window moves
    assert all(results[i].note.covers % 2 == 0 for i in notes)  # whole turns
    # Between slides the note stays in the prompt unchanged: the prompt's start is warm.
    between = [r for i, r in enumerate(results) if r.dropped_tokens and i not in slides]
    assert between and all(r.cached_tokens >= r.prompt_tokens - 40 for r in between)
    # With --memory none nothing is written and the same turns slide.
    plain = sliding_turns(SlotManager(SimModel(FAST, 512), 1, threads=1, cache_bytes=1 << 20,
                                      memory="none"), 40)
    assert all(r.note is None for r in plain) and any(r.dropped_tokens for r in plain)


def test_a_note_sent_with_the_request_is_used_and_one_far_too_long_is_cut_to_fit():
    manager = SlotManager(SimModel(FAST, 512), 1, threads=1, cache_bytes=1 << 20)
    # A stored conversation's note that stands for what slides: no new note is written
    # until more than it stands for slides out.
    results = sliding_turns(manager, 30, session="a", memory="Ada lives in Lisbon.",
                            remembered=24)
    sliding = [r for r in results if r.dropped_tokens]
    assert sliding and sliding[0].note is None
    assert all(r.note is None or r.note.covers > 24 for r in sliding)
    # A client's note of 4,000 characters (what the protocol lets through): the prompt
    # still fits the context with room for the answer, shortened rather than refused.
    huge = sliding_turns(manager, 30, session="b", memory="word " * 800, remembered=24)
    assert all(r.prompt_tokens + 5 <= 512 for r in huge)
    assert all(r.finish == "stop" for r in huge)
