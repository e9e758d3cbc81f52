"""Both ends of a KV state transfer (pichat/worker/daemon/migration.py), wired back to back, and
the receiving end fed hostile pieces: it keeps a state only when every check passes."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from pichat.protocol import MAX_STATE_PIECE, Migrate, State, StateAck, decode
from pichat.router.daemon.migration import refusal_reason
from pichat.worker.daemon.migration import WINDOW, StateMover
from pichat.worker.engine.backend import SavedState

FMT = "llama:abc:f16"


def state(n_bytes: int, tokens: int = 100) -> SavedState:
    data = bytes(i % 253 for i in range(n_bytes))
    return SavedState(tuple(range(tokens)), data, n_bytes + 4 * tokens, owner="o", format=FMT)


class End:
    """One worker's mover and what it sent."""

    def __init__(self, export=None, fmt=FMT, budget=64 << 20) -> None:
        self.sent: list = []
        self.kept: dict[str, SavedState] = {}

        async def no_state(session):
            return None

        self.mover = StateMover(send=lambda frames: self.sent.append(decode(frames)),
                                export=export or no_state,
                                accept=lambda s, st: self.kept.__setitem__(s, st),
                                state_format=fmt, budget=budget, max_tokens=4096,
                                token_bytes=2048)


async def relay(source: End, target: End, tid: str = "t1", *, stall_acks: bool = False):
    """Run a transfer from `source` to `target`, passing messages both ways."""
    task = asyncio.create_task(source.mover.send_state(Migrate(tid, "sess", "w2")))
    delivered = acked = 0
    while not task.done() or delivered < len(source.sent) or acked < len(target.sent):
        while delivered < len(source.sent):
            target.mover.on_state(source.sent[delivered])
            delivered += 1
        while acked < len(target.sent) and not stall_acks:
            source.mover.on_ack(target.sent[acked])
            acked += 1
        await asyncio.sleep(0)
        if stall_acks and not task.done() and delivered == len(source.sent):
            break
    return task


async def test_a_state_of_several_pieces_arrives_whole_with_a_bounded_window():
    big = state(5 * MAX_STATE_PIECE + 123, tokens=3000)

    async def export(session):
        return big

    source, target = End(export), End()
    task = await relay(source, target)
    await task
    assert target.kept["sess"] == big
    pieces = [m for m in source.sent if isinstance(m, State)]
    assert len(pieces) == 6 and pieces[-1].last and pieces[0].tokens == big.tokens
    assert isinstance(target.sent[-1], StateAck) and target.sent[-1].done
    assert (source.mover.sent, target.mover.received) == (1, 1)


async def test_the_source_sends_no_more_than_its_window_ahead_of_the_acks():
    big = state(10 * MAX_STATE_PIECE)

    async def export(session):
        return big

    source = End(export)
    task = asyncio.create_task(source.mover.send_state(Migrate("t", "sess")))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(source.sent) == WINDOW  # then it waits for an acknowledgement
    source.mover.on_ack(StateAck("t", seq=1))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(source.sent) == WINDOW + 2  # two more pieces acknowledged: two more sent
    source.mover.on_ack(StateAck("t", refused="no thanks"))
    await asyncio.wait_for(task, 5)
    assert len(source.sent) == WINDOW + 2  # a refusal stops it


async def test_a_session_not_warm_here_is_aborted_at_once():
    source = End()
    await source.mover.send_state(Migrate("t", "nobody"))
    (abort,) = source.sent
    assert isinstance(abort, State) and abort.abort


def header(**change) -> State:
    s = state(1000)
    fields = dict(transfer="t", seq=0, data=s.data, last=True, session="sess", owner="o",
                  format=FMT, tokens=s.tokens, data_bytes=len(s.data), nbytes=s.nbytes,
                  sha256=hashlib.sha256(s.data).hexdigest())
    fields.update(change)
    return State(**fields)


@pytest.mark.parametrize("piece, reason", [
    (header(format="llama:other:f16"), "made for"),
    (header(format="llama:abc:q8_0"), "made for"),
    (header(sha256="0" * 64), "digest"),
    (header(data_bytes=999, nbytes=999 + 400), "more bytes than announced"),
    (header(data_bytes=1001, nbytes=1001 + 400), "fewer bytes"),
    # A state whose declared size is not what its bytes cost (a hostile or buggy source
    # would have it charged at a few bytes while it holds megabytes)...
    (header(nbytes=10), "declares 10 bytes"),
    (header(nbytes=0), "declares 0 bytes"),
    # ...or whose bytes are more than this model's state of its tokens.
    (header(tokens=(1, 2), data_bytes=8 << 20, nbytes=(8 << 20) + 8), "more than this model's"),
    (header(data_bytes=1 << 40), "more than the session store"),
    (header(tokens=()), "tokens"),
    (header(tokens=tuple(range(5000))), "tokens"),
    (header(session=""), "no session"),
])
def test_the_target_refuses_what_does_not_check_out(piece, reason):
    target = End()
    target.mover.on_state(piece)
    assert target.kept == {}
    (ack,) = target.sent
    assert isinstance(ack, StateAck) and reason in ack.refused
    assert target.mover.refused == 1


def test_pieces_out_of_order_or_of_unknown_transfers_are_refused_or_dropped():
    target = End()
    target.mover.on_state(header(last=False, data=b"x" * 10))
    target.mover.on_state(State("t", 2, b"y"))  # piece 1 skipped
    assert "out of order" in target.sent[-1].refused
    target.mover.on_state(State("t", 3, b"z", last=True))  # after the refusal: dropped
    target.mover.on_state(State("unknown", 5, b"z"))
    assert len(target.sent) == 2 and target.kept == {}


def test_a_receiver_takes_at_most_two_transfers_at_once_and_expires_stalled_ones(
        monkeypatch):
    import pichat.worker.daemon.migration as migration

    target = End()
    for tid in ("a", "b", "c"):
        target.mover.on_state(header(transfer=tid, last=False, data=b""))
    assert "too many" in target.sent[-1].refused
    clock = [migration.time.monotonic() + migration.STALL_S + 1]
    monkeypatch.setattr(migration.time, "monotonic", lambda: clock[0])
    target.mover.expire()
    assert sorted(a.transfer for a in target.sent if "stalled" in a.refused) == ["a", "b"]


@pytest.mark.parametrize("failure, reason", [
    ("the target refused it: made for llama:a:f16, not llama:b:f16", "format"),
    ("the target refused it: 900 bytes is more than the session store holds", "size"),
    ("the target refused it: 5000 tokens do not fit the context", "size"),
    ("the target refused it: the digest does not match", "corrupt"),
    ("the target refused it: fewer bytes than announced", "corrupt"),
    ("its first piece names another session or owner", "corrupt"),
    ("the target refused it: too many transfers at once", "busy"),
    ("the source gave up: the session is not warm here", "not_warm"),
    ("stalled for 10s", "stalled"),
    ("a worker of the transfer was lost", "lost"),
    ("the target refused it: " + "made up by a hostile worker " * 40, "other"),
])
def test_failed_transfers_are_counted_by_one_of_a_few_reasons(failure, reason):
    assert refusal_reason(failure) == reason
