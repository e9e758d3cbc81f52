"""The wire: every message round-trips, and malformed input is rejected with a clear error."""

from __future__ import annotations

import math

import msgpack
import pytest

from pichat.errors import ErrorCode, ProtocolError
from pichat.protocol import (
    TAG,
    Cancel,
    ChatMessage,
    Chunk,
    Command,
    Conversations,
    Disconnect,
    Done,
    Error,
    Heartbeat,
    Ready,
    Request,
    RequestId,
    Sampling,
    SessionId,
    Status,
    Usage,
    decode,
    encode,
)

MESSAGES = [
    Ready("pi1", "qwen", "llama", 2, 4096, "0.1.0", (("s1", "lease1"), ("s2", "lease2"))),
    Ready("pi1", "qwen", "llama", 2, 4096, "0.1.0"),
    Ready("pi1", "qwen", "llama", 4, 4096, "0.1.0", engine="batched", kv_type="q8_0",
          kv_cells=16384, kv_token_bytes=6528, cache_bytes=256 << 20),
    Heartbeat(),
    Heartbeat(busy=1, warm=3, evicted=("old",), tps=12.5),
    Heartbeat(busy=2, kv_used=1500, store_bytes=9 << 20),
    Request(RequestId("r1"), (ChatMessage("system", "be brief"), ChatMessage("user", "hi")),
            Sampling(temperature=0.0, seed=7, max_tokens=20, stop=("\n\n",)),
            session=SessionId("s1"), timeout=30.0, model="qwen"),
    Request(RequestId("r4"), (ChatMessage("user", "hi"),), session=SessionId("o~s1"),
            continuation=(5, 70000), owner="a1b2", isolate=True, lease="f00d"),
    Request(RequestId("r2"), (ChatMessage("user", "héllo ✓"),)),
    Request(RequestId("r3"), (), prompt="Once upon a time"),
    Chunk(RequestId("r1"), 3, "text ✓"),
    Done(RequestId("r1"), "pi1", "stop", Usage(10, 4, 5, 12.5, 80.0)),
    Error("r1", ErrorCode.BUSY, "all slots busy"),
    Error("", ErrorCode.PROTOCOL, "bad"),
    Cancel(RequestId("r1")),
    Disconnect("bye"),
    Status(),
    Status({"workers": [{"name": "pi1"}], "queue": {"depth": 0}}),
    Request(RequestId("r5"), (ChatMessage("user", "and then?"),), conversation="trip"),
    Done(RequestId("r5"), "pi1", "stop", Usage(10, 4, 5, 1.0, 2.0), conversation="c0ffee"),
    Request(RequestId("r6"), (ChatMessage("user", "and now?"),), memory="Ada, Lisbon.",
            remembered=12, truncate=False, attempt=2),
    Done(RequestId("r6"), "pi1", "stop", Usage(900, 850, 5, 1.0, 2.0, 300),
         memory="The user is Ada.", remembered=12),
    Conversations("list", "ref1", limit=20),
    Conversations("get", "ref2", id="c0ffee", offset=40, limit=10,
                  result={"id": "c0ffee", "messages": [{"role": "user", "content": "hi"}]}),
    Conversations("rename", id="trip", title="Oslo 2027"),
    Conversations("list", "ref3", result=[{"id": "a", "title": "t"}]),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message):
    frames = encode(message)
    assert frames[0] == TAG
    assert len(frames) == 3
    assert decode(frames) == message


def _frames(command: Command, body) -> list[bytes]:
    return [TAG, bytes([command]), msgpack.packb(body)]


GOOD_REQUEST = {"id": "r1", "messages": [{"role": "user", "content": "hi"}]}

MALFORMED = [
    # (frames, what the error must mention)
    ([TAG, b"\x03"], "3 frames"),
    ([TAG, b"\x03", b"", b""], "3 frames"),
    ([b"HTTP/1.1", b"\x03", b""], "not a pichat message"),
    ([TAG, b"\x63", msgpack.packb({})], "unknown command"),
    ([TAG, b"\x03\x03", msgpack.packb({})], "unknown command"),
    ([TAG, b"\x03", b"\xc1"], "not valid msgpack"),
    ([TAG, b"\x03", b"\x92\x01"], "not valid msgpack"),  # truncated array
    (_frames(Command.REQUEST, [1, 2]), "must be a map"),
    (_frames(Command.REQUEST, {"id": "r1"}), "messages"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": []}), "messages"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "id": ""}), "'id'"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "id": "x" * 65}), "'id'"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "id": 5}), "'id'"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": ["hi"]}), "messages[0]"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": [{"role": "robot", "content": "x"}]}),
     "role"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": [{"role": "user", "content": 3}]}),
     "content"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"temperature": "hot"}}), "temperature"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"temperature": math.nan}}),
     "temperature"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"temperature": 99}}), "temperature"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"max_tokens": 0}}), "max_tokens"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"max_tokens": True}}), "max_tokens"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"stop": "x"}}), "stop"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"stop": [""]}}), "stop"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": {"stop": ["a"] * 9}}), "stop"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "sampling": 5}), "sampling"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "timeout": -1}), "timeout"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "session": ""}), "session"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "prompt": "text"}), "not both"),
    (_frames(Command.REQUEST, {"id": "r1", "prompt": 5}), "prompt"),
    (_frames(Command.READY, {"worker": "w", "model": "m", "backend": "llama", "slots": 0,
                             "ctx": 10, "version": "1"}), "slots"),
    (_frames(Command.READY, {"worker": "w"}), "missing"),
    (_frames(Command.CHUNK, {"id": "r", "seq": -1, "text": "x"}), "seq"),
    (_frames(Command.CHUNK, {"id": "r", "seq": 0, "text": b"bytes"}), "text"),
    (_frames(Command.DONE, {"id": "r", "worker": "w", "finish": "exploded", "usage": {}}),
     "finish"),
    (_frames(Command.DONE, {"id": "r", "worker": "w", "finish": "stop",
                            "usage": {"prompt_tokens": 1, "cached_tokens": 2,
                                      "completion_tokens": 0, "prompt_ms": 0, "generate_ms": 0}}),
     "cached_tokens"),
    (_frames(Command.HEARTBEAT, {"evicted": "s1"}), "evicted"),
    (_frames(Command.STATUS, {"cluster": [1]}), "cluster"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "conversation": ""}), "conversation"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "conversation": "x" * 201}), "conversation"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "memory": "x" * 4001}), "memory"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "memory": "x", "remembered": -1}), "remembered"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "memory": 7}), "memory"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "attempt": -1}), "attempt"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "attempt": 1001}), "attempt"),
    (_frames(Command.CONVERSATIONS, {"op": "drop table"}), "op must be one of"),
    (_frames(Command.CONVERSATIONS, {}), "op"),
    (_frames(Command.CONVERSATIONS, {"op": "list", "limit": 0}), "limit"),
    (_frames(Command.CONVERSATIONS, {"op": "list", "limit": 10**6}), "limit"),
    (_frames(Command.CONVERSATIONS, {"op": "get", "id": 5}), "'id'"),
    (_frames(Command.CONVERSATIONS, {"op": "list", "result": "x"}), "result"),
    # Wrong types where a hashable value was assumed, and huge values: a clear, short error.
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": [{"role": ["user"], "content": "x"}]}),
     "messages[0].role"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "messages": [{"role": {"a": 1}, "content": "x"}]}),
     "messages[0].role"),
    (_frames(Command.REQUEST, {**GOOD_REQUEST, "isolate": "yes"}), "isolate"),
    (_frames(Command.READY, {"worker": "w", "model": "m", "backend": "llama", "slots": 1,
                             "ctx": 10, "version": "1", "warm": {"s": 5}}), "warm"),
    (_frames(Command.READY, {"worker": "w", "model": "m", "backend": "llama", "slots": 1,
                             "ctx": 10, "version": "1", "warm": ["s"]}), "warm"),
    # Bodies that would decode to far more objects than the command can hold.
    ([TAG, bytes([Command.REQUEST]), msgpack.packb({**GOOD_REQUEST, "x": [[]] * 100_000})],
     "objects"),
    ([TAG, bytes([Command.CANCEL]), msgpack.packb({"id": "r", "x": ["ab"] * 10_000})],
     "objects"),
    ([TAG, bytes([Command.REQUEST]), msgpack.packb({**GOOD_REQUEST,
                                                    "continuation": list(range(200_000))})],
     "over the limits"),
    ([TAG, bytes([Command.CHUNK]), msgpack.packb({"id": "r", "seq": 0, "text": "x",
                                                  "tokens": [[[[[[[[[1]]]]]]]]] * 3000})],
     "nested deeper"),
    ([TAG, bytes([Command.ERROR]), msgpack.packb({"id": "r", "code": "x",
                                                  "message": "m" * 100_000})], "max_str_len"),
]


@pytest.mark.parametrize("frames, mentions", MALFORMED)
def test_malformed_is_rejected_with_a_clear_error(frames, mentions):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert mentions in str(info.value)
    assert info.value.code is ErrorCode.PROTOCOL


@pytest.mark.parametrize("frames", [
    _frames(Command.REQUEST, {**GOOD_REQUEST, "messages": [{"role": "r" * 300_000,
                                                           "content": "x"}]}),
    [b"PICHAT" + b"9" * 1_000_000, b"\x03", b"\x80"],
    [TAG, b"\x77" * 1_000_000, b"\x80"],
    _frames(Command.REQUEST, {**GOOD_REQUEST, "id": "i" * 300_000}),
])
def test_errors_quote_what_a_peer_sent_only_clipped(frames):
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert len(str(info.value)) < 300


def test_other_version_is_a_version_error():
    frames = encode(Heartbeat())
    frames[0] = b"PICHAT2"
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code is ErrorCode.VERSION
    assert "PICHAT1" in str(info.value)


def test_error_names_the_request_when_it_can():
    frames = _frames(Command.REQUEST, {"id": "req-7", "messages": "nope"})
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.request_id == "req-7"


def test_unknown_fields_are_ignored_for_forward_compatibility():
    frames = _frames(Command.REQUEST, {**GOOD_REQUEST, "future_field": {"x": 1}})
    request = decode(frames)
    assert isinstance(request, Request)
    assert request.sampling == Sampling()


def test_unknown_error_code_degrades_to_internal_and_keeps_message():
    frames = _frames(Command.ERROR, {"id": "r", "code": "quota_exceeded", "message": "later"})
    error = decode(frames)
    assert error == Error("r", ErrorCode.INTERNAL, "later")


def test_usage_tokens_per_second():
    assert Usage(completion_tokens=11, generate_ms=1000.0).tokens_per_s == pytest.approx(10.0)
    assert Usage(completion_tokens=1, generate_ms=5.0).tokens_per_s == 0.0


def _largest_requests() -> list[Request]:
    """The largest REQUEST of each kind `Request.from_body` accepts: every list at its
    maximum, every message with all its fields."""
    from pichat.protocol import (
        MAX_EMBED_INPUTS,
        MAX_ID_CHARS,
        MAX_MEMORY_CHARS,
        MAX_MESSAGES,
        MAX_STOP_STRINGS,
    )
    sampling = Sampling(stop=tuple(f"s{i}" for i in range(MAX_STOP_STRINGS)), seed=7)
    extra = dict(session=SessionId("s" * 100), timeout=10.0, model="m", owner="o" * 32,
                 isolate=True, lease="l" * MAX_ID_CHARS, truncate=False,
                 memory="n" * MAX_MEMORY_CHARS, remembered=3, tools="[]",
                 tool_choice="required", format="json", sampling=sampling)
    call = ChatMessage("assistant", "", tool_calls='[{"id":"c","name":"f","arguments":"{}"}]',
                       tool_call_id="c")
    return [Request(RequestId("i" * MAX_ID_CHARS), (call,) * MAX_MESSAGES,
                    continuation=(1,) * 1000, **extra),
            Request(RequestId("e"), (), embed=("x",) * MAX_EMBED_INPUTS),
            Request(RequestId("p"), (), prompt="hello", continuation=(5,) * 100_000)]


def test_the_largest_request_a_worker_accepts_decodes_within_its_limits():
    from pichat.protocol import check
    for request in _largest_requests():
        check(request)  # what the router checks before it sends...
        assert decode(encode(request)) == request  # ...is what a worker decodes


def test_a_body_too_big_to_decode_still_names_its_request():
    """A worker that cannot decode a request it can attribute answers ERROR at once,
    rather than nothing (the slot would be held until the request timed out)."""
    from pichat.protocol import MAX_MESSAGES, REQUEST_OBJECTS
    wide = {"role": "user", "content": "x", **{f"k{i}": i for i in range(20)}}
    for body, request_id in (
            ({"id": "r-1", "messages": [wide] * MAX_MESSAGES}, "r-1"),
            ({"id": "r-2", "messages": [[[]] * 64] * (REQUEST_OBJECTS // 64)}, "r-2"),
            # Keys before it are skipped over in C, not built.
            ({"messages": [wide] * MAX_MESSAGES, "id": "late"}, "late"),
            ({**{f"k{i}": 0 for i in range(8)}, "id": "too-late", "messages": [wide] * 5000},
             ""),
            ({"id": ["not", "a", "string"], "messages": [wide] * MAX_MESSAGES}, ""),
            ({"id": "x" * 65, "messages": [wide] * MAX_MESSAGES}, "")):
        with pytest.raises(ProtocolError, match="objects") as info:
            decode([TAG, bytes((Command.REQUEST,)), msgpack.packb(body)])
        assert info.value.request_id == request_id
