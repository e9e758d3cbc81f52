"""A request's router-side bookkeeping: what the client has, and how a failover goes on."""

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
from pichat.router.jobs import ClientJob

REQUEST = Request(RequestId("r"), (ChatMessage("user", "hi"),), Sampling(max_tokens=10))


def job() -> ClientJob:
    return ClientJob(sink=None, request=REQUEST, arrived=0.0)


def test_without_failover_chunks_and_done_pass_unchanged():
    j = job()
    assert j.delivered(Chunk(RequestId("r"), 0, "a", (1,))) is None
    assert j.final(Done(RequestId("r"), "w", "stop", Usage(3, 0, 1))) is None
    assert (j.text, j.tokens, j.chunks) == (["a"], [1], 1)


def test_a_failover_continues_after_what_the_client_has():
    j = job()
    j.delivered(Chunk(RequestId("r"), 0, "Once", (11,)))
    j.delivered(Chunk(RequestId("r"), 1, " upon", (12, 13)))
    sent = j.continue_elsewhere()
    assert sent.continuation == (11, 12, 13) and sent.sampling.max_tokens == 7
    assert j.outgoing == sent  # what the next worker is sent
    # The next worker numbers from 0; the client sees 2, 3, ...
    assert j.delivered(Chunk(RequestId("r"), 0, " a", (14,))).seq == 2
    assert j.delivered(Chunk(RequestId("r"), 1, " time", (15,))).seq == 3
    done = j.final(Done(RequestId("r"), "w2", "stop", Usage(5 + 3, 4, 2, 1.0, 1.0)))
    assert done.failovers == 1
    # As if one worker had answered: 5 prompt tokens (not 8), 3 + 2 generated.
    assert (done.usage.prompt_tokens, done.usage.cached_tokens,
            done.usage.completion_tokens) == (5, 4, 5)
    assert "".join(j.text) == "Once upon a time"


def test_a_second_failover_resumes_after_everything_delivered():
    j = job()
    j.delivered(Chunk(RequestId("r"), 0, "a", (1,)))
    j.continue_elsewhere()
    j.delivered(Chunk(RequestId("r"), 0, "b", (2,)))
    again = j.continue_elsewhere()
    assert again.continuation == (1, 2) and again.sampling.max_tokens == 8
    assert j.delivered(Chunk(RequestId("r"), 0, "c", (3,))).seq == 2
    assert j.final(Done(RequestId("r"), "w3", "length", Usage(4, 0, 1))).failovers == 2


def test_a_failover_of_a_clients_own_continuation_keeps_it():
    # A client whose router restarted asks for the rest of its answer (a continuation);
    # if that worker dies too, the next one continues after both parts.
    request = Request(RequestId("r"), (ChatMessage("user", "hi"),), Sampling(max_tokens=8),
                      continuation=(5, 6))
    j = ClientJob(sink=None, request=request, arrived=0.0)
    j.delivered(Chunk(RequestId("r"), 0, "x", (7,)))
    sent = j.continue_elsewhere()
    assert sent.continuation == (5, 6, 7) and sent.sampling.max_tokens == 7
    done = j.final(Done(RequestId("r"), "w", "stop", Usage(prompt_tokens=13, completion_tokens=2)))
    # The router accounts for its own part only; the client then for the part it sent.
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.failovers) == (12, 3, 1)
