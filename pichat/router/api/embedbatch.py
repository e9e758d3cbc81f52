"""Small embeddings requests batched at the router: one owner's requests for one model
that arrive within `WINDOW` seconds go to a worker as one request (up to
`MAX_EMBED_INPUTS` inputs), whose vectors are handed back to each caller. A worker
embeds several inputs per decode (16 per request measured 1.97x one at a time), so many
clients each sending one sentence (a document split by an app, say) get that speed too.

Only one owner's requests share a batch (its inputs never ride on another's share of the
cluster, and its failure touches only its own). A batch that fails as a whole (one input
too long, say) is sent again request by request, so each gets its own answer or error.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pichat.client import new_id
from pichat.protocol import MAX_EMBED_INPUTS, Chunk, Done, Error, Request, RequestId, Usage

__all__ = ["EmbedBatcher", "WINDOW"]

WINDOW = 0.005
"""Seconds a first request waits for others to join its batch."""


@dataclass(slots=True)
class _Batch:
    requests: list[Request] = field(default_factory=list)
    waiters: list[asyncio.Future] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None

    @property
    def inputs(self) -> int:
        return sum(len(r.embed) for r in self.requests)


class _Sink:
    """Where a batch's answer goes (the router's ReplySink protocol)."""

    def __init__(self, done: Callable[[Done | Error], None]) -> None:
        self.key = object()
        self._done = done

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        if not isinstance(message, Chunk):
            self._done(message)
        return True

    def keepalive(self) -> bool:
        return True


class EmbedBatcher:
    def __init__(self, submit: Callable[..., None], window: float = WINDOW) -> None:
        self._submit = submit
        self.window = window
        self._open: dict[tuple[str | None, str], _Batch] = {}
        self.batches = 0
        """Batches sent (a request alone counts as one)."""

    async def embed(self, request: Request, owner: str) -> Done | Error:
        """`request`'s answer: a DONE with its vectors, or an ERROR."""
        key = (request.model, owner)
        batch = self._open.get(key)
        if batch is not None and batch.inputs + len(request.embed) > MAX_EMBED_INPUTS:
            self._flush(key)
            batch = None
        if batch is None:
            batch = self._open[key] = _Batch()
            batch.timer = asyncio.get_running_loop().call_later(self.window, self._flush, key)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        batch.requests.append(request)
        batch.waiters.append(future)
        if batch.inputs >= MAX_EMBED_INPUTS:
            self._flush(key)
        return await future

    def _flush(self, key: tuple[str | None, str]) -> None:
        batch = self._open.pop(key, None)
        if batch is None:
            return
        if batch.timer is not None:
            batch.timer.cancel()
        self._send(batch.requests, batch.waiters, key[1])

    def _send(self, requests: list[Request], waiters: list[asyncio.Future], owner: str) -> None:
        self.batches += 1
        if len(requests) == 1:
            self._submit(requests[0], _Sink(lambda m: _settle(waiters[0], m)), owner=owner)
            return
        combined = Request(RequestId(new_id()), (), model=requests[0].model,
                           embed=tuple(x for r in requests for x in r.embed))

        def answered(message: Done | Error) -> None:
            if isinstance(message, Error):  # each on its own: each its own answer
                for request, waiter in zip(requests, waiters):
                    self._send([request], [waiter], owner)
                return
            start = 0
            chars = sum(len(x) for r in requests for x in r.embed) or 1
            for request, waiter in zip(requests, waiters):
                n = len(request.embed)
                share = sum(len(x) for x in request.embed) / chars
                usage = Usage(prompt_tokens=round(message.usage.prompt_tokens * share),
                              prompt_ms=message.usage.prompt_ms)
                _settle(waiter, replace(message, id=request.id, usage=usage,
                                        embeddings=message.embeddings[start:start + n]))
                start += n

        self._submit(combined, _Sink(answered), owner=owner)


def _settle(waiter: asyncio.Future, message: Any) -> None:
    if not waiter.done():
        waiter.set_result(message)
