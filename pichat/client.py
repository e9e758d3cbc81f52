"""The asyncio client library behind `pichat ask`, `chat`, `status` and the benchmarks.

One DEALER socket carries any number of concurrent requests; replies are routed to each
request's queue by id. While a request waits, the router heartbeats the client; if the
router falls silent for `silence_timeout` (it died or restarted), the request is sent
again (`resend_on_silence` times; an answer already streaming goes on as a continuation
after the tokens received, so nothing is lost or repeated), then fails with
`RouterUnavailable` instead of hanging. Leaving a stream early (break, Ctrl-C, an
exception) sends CANCEL so the worker's slot frees at once.

    async with Client(ClientConfig("tcp://pi1:5555")) as client:
        reply = await client.chat([ChatMessage("user", "Hello!")], on_text=print)
        print(reply.usage.cached_tokens)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import zmq

from pichat.config import ClientConfig
from pichat.errors import ProtocolError, RequestFailed, RouterUnavailable
from pichat.protocol import (
    Cancel,
    ChatMessage,
    Chunk,
    Done,
    Error,
    Heartbeat,
    Request,
    RequestId,
    Sampling,
    SessionId,
    Status,
    decode,
    encode,
)
from pichat.security import Link
from pichat.transport import Channel

__all__ = ["Client", "Reply", "new_id"]


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(slots=True)
class Reply:
    id: str
    text: str
    done: Done
    ttft: float
    """Seconds from sending the request to its first chunk (or to DONE if none)."""
    elapsed: float

    @property
    def worker(self) -> str:
        return self.done.worker

    @property
    def usage(self):
        return self.done.usage

    @property
    def finish(self) -> str:
        return self.done.finish


class Client:
    def __init__(self, config: ClientConfig | None = None, *,
                 context: zmq.Context | None = None) -> None:
        """`context`: a ZeroMQ context to share (many clients in one process); by default
        the client makes and ends its own."""
        self.config = config or ClientConfig()
        self._shared_ctx = context
        self._ctx: zmq.Context | None = None
        self._channel: Channel | None = None
        self._pending: dict[str, asyncio.Queue] = {}
        self._status_waiters: deque[asyncio.Future] = deque()
        self._last_heard = 0.0
        self._link: Link | None = None
        self._refused: str | None = None

    async def __aenter__(self) -> Client:
        self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    def connect(self) -> None:
        self._ctx = self._shared_ctx or zmq.Context()
        cfg = self.config
        self._link = Link(self._ctx, cfg.router, keys=cfg.keys, key_name=cfg.key_name,
                          max_message_bytes=cfg.max_message_bytes,
                          loop=asyncio.get_running_loop(), on_message=self._on_message,
                          on_refused=self._on_refused)
        self._channel = self._link.channel

    def close(self) -> None:
        if self._link is not None:
            # A short linger lets a last CANCEL reach the router.
            self._link.close(linger_ms=200)
            self._link = None
            self._channel = None
        if self._ctx is not None and self._shared_ctx is None:
            self._ctx.term()
        self._ctx = None

    # --- requests ---------------------------------------------------------------------

    async def stream(self, messages: Sequence[ChatMessage], *, session: str | None = None,
                     sampling: Sampling | None = None, model: str | None = None,
                     timeout: float | None = None,
                     request_id: str | None = None) -> AsyncIterator[Chunk | Done]:
        """Send one chat request; yield its chunks, then its DONE. Raises RequestFailed
        (with the ERROR's code) or RouterUnavailable."""
        request = Request(
            id=RequestId(request_id or new_id()),
            messages=tuple(messages),
            sampling=sampling or Sampling(),
            session=SessionId(session) if session else None,
            timeout=timeout,
            model=model,
        )
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request.id] = queue
        current = request  # what the router was last sent
        finished = False
        try:
            self._send(encode(current))
            expected = 0  # chunks yielded
            base = 0  # of those, yielded before `current` was sent
            tokens: list[int] = []  # the token ids of the text yielded
            resumable = True  # every chunk so far said which tokens it holds
            resumes = 0
            resends = self.config.resend_on_silence
            while True:
                try:
                    message = await self._next(queue)
                except RouterUnavailable:
                    if resends <= 0 or self._refused or not resumable or (
                            len(tokens) >= request.sampling.max_tokens):
                        raise
                    # The router fell silent: it may have restarted and forgotten the
                    # request. If nothing has streamed yet, send it again as it was; else
                    # ask for the rest of the answer.
                    resends -= 1
                    if expected:
                        current = self._continuation(request, current, tokens, queue)
                        base = expected
                        resumes += 1
                    self._send(encode(current))
                    continue
                match message:
                    case Chunk():
                        if base + message.seq != expected:
                            raise ProtocolError(f"chunk {base + message.seq} arrived where "
                                                f"{expected} was due")
                        expected += 1
                        tokens.extend(message.tokens)
                        resumable = resumable and (bool(message.tokens) or not message.text)
                        yield message if not base else replace(message, seq=expected - 1)
                    case Done():
                        finished = True
                        resumed = len(current.continuation) - len(request.continuation)
                        yield message.continued(resumed, resumes) if resumes else message
                        return
                    case Error():
                        finished = True
                        raise RequestFailed(message.message, message.code)
        finally:
            del self._pending[current.id]
            if not finished and self._channel is not None:
                self._send(encode(Cancel(current.id)))

    def _continuation(self, request: Request, current: Request, tokens: list[int],
                      queue: asyncio.Queue) -> Request:
        """The rest of a partly streamed answer, under a new id: a continuation after the
        tokens already delivered (what the router itself does when a worker dies
        mid-answer), so the answer goes on with no token lost or repeated."""
        with contextlib.suppress(RouterUnavailable):
            self._send(encode(Cancel(current.id)))  # in case the old router lives on
        sampling = request.sampling
        resumed = replace(request, id=RequestId(new_id()),
                          continuation=request.continuation + tuple(tokens),
                          sampling=replace(sampling, max_tokens=sampling.max_tokens - len(tokens)))
        del self._pending[current.id]
        self._pending[resumed.id] = queue
        return resumed

    async def chat(self, messages: Sequence[ChatMessage], *,
                   on_text: Callable[[str], None] | None = None, **kwargs: Any) -> Reply:
        """`stream` collected into a `Reply`; `on_text` sees each piece as it comes."""
        start = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        request_id = kwargs.pop("request_id", None) or new_id()
        async for event in self.stream(messages, request_id=request_id, **kwargs):
            if first is None:
                first = time.perf_counter()
            if isinstance(event, Chunk):
                parts.append(event.text)
                if on_text is not None:
                    on_text(event.text)
            else:
                end = time.perf_counter()
                return Reply(request_id, "".join(parts), event, first - start, end - start)
        raise ProtocolError("the stream ended without DONE")

    async def status(self) -> dict[str, Any]:
        """The router's snapshot of the cluster (as `pichat status --json`)."""
        future = asyncio.get_running_loop().create_future()
        self._status_waiters.append(future)
        self._send(encode(Status()))
        try:
            return dict(await asyncio.wait_for(asyncio.shield(future),
                                               self.config.silence_timeout))
        except TimeoutError:
            raise RouterUnavailable(self._silence_message()) from None
        finally:
            if future in self._status_waiters:
                self._status_waiters.remove(future)

    async def cancel(self, request_id: str) -> None:
        self._send(encode(Cancel(RequestId(request_id))))

    # --- internals --------------------------------------------------------------------

    async def _next(self, queue: asyncio.Queue) -> Any:
        loop = asyncio.get_running_loop()
        self._last_heard = max(self._last_heard, loop.time())
        while True:
            if not queue.empty():
                return queue.get_nowait()
            remaining = self._last_heard + self.config.silence_timeout - loop.time()
            if remaining <= 0:
                raise RouterUnavailable(self._silence_message())
            try:
                # Waiting on a Queue (not on the socket) is safe to time out.
                return await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                continue

    def _silence_message(self) -> str:
        if self._refused:
            return (f"{self._refused}: the router at {self.config.router} does not accept "
                    f"this client's key ({self.config.key_name}.key must be in the router's "
                    "clients/ directory, and router.key must be the router's)")
        return (f"no answer from the router at {self.config.router} for "
                f"{self.config.silence_timeout:.0f}s: is it running and reachable?")

    def _on_refused(self, reason: str) -> None:
        self._refused = reason

    def _send(self, frames: list[bytes]) -> None:
        if self._channel is None:
            raise RuntimeError("client is not connected")
        try:
            self._channel.send(frames)
        except zmq.Again:
            if self._refused:
                raise RouterUnavailable(self._silence_message()) from None
            raise RouterUnavailable(
                f"no connection to the router at {self.config.router}: is it running, and does "
                "it need keys (--keys)?") from None

    def _on_message(self, frames: list[bytes]) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        try:
            message = decode(frames)
        except ProtocolError:
            return  # nothing we can do with it; the request will time out or finish
        match message:
            case Chunk() | Done() | Error():
                queue = self._pending.get(message.id)
                if queue is not None:
                    queue.put_nowait(message)
                elif isinstance(message, Error) and not message.id:
                    for queue in self._pending.values():
                        queue.put_nowait(message)
            case Status():
                while self._status_waiters:
                    future = self._status_waiters.popleft()
                    if not future.done():
                        future.set_result(message.cluster)
                        break
            case Heartbeat():
                pass
