"""A stream as its receiver sees it: what it has, and how the rest is asked for elsewhere
(the router's failover and the client's resume after a router restart share it)."""

from __future__ import annotations

from pichat.protocol import (
    ChatMessage,
    Chunk,
    Done,
    Request,
    RequestId,
    Sampling,
    Usage,
)
from pichat.router.policy.jobs import ClientJob
from pichat.stream import StreamCursor

REQUEST = Request(RequestId("r"), (ChatMessage("user", "hi"),), Sampling(max_tokens=10))


def job() -> ClientJob:
    return ClientJob(sink=None, request=REQUEST, arrived=0.0)


def test_without_failover_chunks_and_done_pass_unchanged():
    j = job()
    chunk, done = Chunk(RequestId("r"), 0, "a", (1,)), Done(RequestId("r"), "w", "stop",
                                                             Usage(3, 0, 1))
    assert j.cursor.accept(chunk) is chunk  # forwarded as it came
    assert j.cursor.final(done) is done
    assert (j.cursor.text, j.cursor.tokens, j.cursor.chunks) == (["a"], [1], 1)


def test_a_failover_continues_after_what_the_client_has():
    j = job()
    j.cursor.accept(Chunk(RequestId("r"), 0, "Once", (11,)))
    j.cursor.accept(Chunk(RequestId("r"), 1, " upon", (12, 13)))
    sent = j.continue_elsewhere()
    assert sent.continuation == (11, 12, 13) and sent.sampling.max_tokens == 7
    assert j.outgoing == sent  # what the next worker is sent
    # The next worker numbers from 0; the client sees 2, 3, ...
    assert j.cursor.accept(Chunk(RequestId("r"), 0, " a", (14,))).seq == 2
    assert j.cursor.accept(Chunk(RequestId("r"), 1, " time", (15,))).seq == 3
    done = j.cursor.final(Done(RequestId("r"), "w2", "stop", Usage(5 + 3, 4, 2, 1.0, 1.0)))
    assert done.failovers == 1
    # As if one worker had answered: 5 prompt tokens (not 8), 3 + 2 generated.
    assert (done.usage.prompt_tokens, done.usage.cached_tokens,
            done.usage.completion_tokens) == (5, 4, 5)
    assert "".join(j.cursor.text) == "Once upon a time"


def test_a_second_failover_resumes_after_everything_delivered():
    j = job()
    j.cursor.accept(Chunk(RequestId("r"), 0, "a", (1,)))
    j.continue_elsewhere()
    j.cursor.accept(Chunk(RequestId("r"), 0, "b", (2,)))
    again = j.continue_elsewhere()
    assert again.continuation == (1, 2) and again.sampling.max_tokens == 8
    assert j.cursor.accept(Chunk(RequestId("r"), 0, "c", (3,))).seq == 2
    assert j.cursor.final(Done(RequestId("r"), "w3", "length", Usage(4, 0, 1))).failovers == 2


def test_a_failover_of_a_clients_own_continuation_keeps_it():
    # A client whose router restarted asks for the rest of its answer (a continuation);
    # if that worker dies too, the next one continues after both parts.
    request = Request(RequestId("r"), (ChatMessage("user", "hi"),), Sampling(max_tokens=8),
                      continuation=(5, 6))
    j = ClientJob(sink=None, request=request, arrived=0.0)
    j.cursor.accept(Chunk(RequestId("r"), 0, "x", (7,)))
    sent = j.continue_elsewhere()
    assert sent.continuation == (5, 6, 7) and sent.sampling.max_tokens == 7
    done = j.cursor.final(Done(RequestId("r"), "w", "stop",
                               Usage(prompt_tokens=13, completion_tokens=2)))
    # The router accounts for its own part only; the client then for the part it sent.
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.failovers) == (12, 3, 1)


def test_the_budget_left_is_at_least_one_token_and_a_spent_one_cannot_resume():
    cursor = StreamCursor(Request(RequestId("r"), (ChatMessage("user", "hi"),),
                                  Sampling(max_tokens=2)))
    cursor.accept(Chunk(RequestId("r"), 0, "a", (1,)))
    assert cursor.can_resume and cursor.resume().sampling.max_tokens == 1
    cursor.accept(Chunk(RequestId("r"), 0, "b", (2,)))
    assert not cursor.can_resume  # the whole budget is delivered
    assert cursor.resume().sampling.max_tokens == 1  # floored, never 0


def test_a_chunk_without_token_ids_makes_the_stream_unresumable():
    cursor = StreamCursor(REQUEST)
    cursor.accept(Chunk(RequestId("r"), 0, "", ()))   # empty text: nothing to lose
    assert cursor.can_resume
    cursor.accept(Chunk(RequestId("r"), 1, "text", ()))
    assert not cursor.can_resume


def test_the_client_resumes_under_a_new_id():
    cursor = StreamCursor(REQUEST)
    cursor.accept(Chunk(RequestId("r"), 0, "a", (1,)))
    again = cursor.resume(RequestId("r2"))
    assert again.id == "r2" and again.continuation == (1,)
    assert cursor.expected_seq == 0  # the new source numbers from 0

