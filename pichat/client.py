"""The asyncio client library behind `pichat ask`, `chat`, `status` and the benchmarks.

One DEALER socket carries any number of concurrent requests; replies are routed to each
request's queue by id. While a request waits, the router heartbeats the client; if the
router falls silent for `ClientConfig.silence` (it died or restarted), the request is sent
again (`resend_on_silence` times; an answer already streaming goes on as a continuation
after the tokens received, so nothing is lost or repeated), then fails with
`RouterUnavailable` instead of hanging. With several routers (`ClientConfig.router`
"tcp://pi1:5555,tcp://pi2:5555"), silence moves the client to the next one before it
sends again, so a router's death costs a request one silence. Leaving a stream early
(break, Ctrl-C, an exception) sends CANCEL so the worker's slot frees at once.

    async with Client(ClientConfig("tcp://pi1:5555")) as client:
        reply = await client.chat([ChatMessage("user", "Hello!")], on_text=print)
        print(reply.usage.cached_tokens)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import zmq

from pichat.config import ClientConfig
from pichat.errors import ProtocolError, RequestFailed, RouterUnavailable
from pichat.link import Link
from pichat.protocol import (
    Cancel,
    ChatMessage,
    Chunk,
    Conversations,
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
from pichat.stream import StreamCursor
from pichat.transport import Channel

__all__ = ["Client", "Reply", "new_id"]

log = logging.getLogger(__name__)

_MOVED = object()
"""Put in each waiting request's queue when the client moves to another router."""


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
        self._queries: dict[str, asyncio.Future] = {}
        """CONVERSATIONS asked, by ref."""
        self._last_heard = 0.0
        self._link: Link | None = None
        self._refused: str | None = None
        self._at = 0
        """Which of the configured routers the link goes to."""
        self.moves = 0
        """Times the client moved to another router (each a new link)."""

    async def __aenter__(self) -> Client:
        self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        """The router the client talks to now."""
        return self.config.routers[self._at]

    def connect(self) -> None:
        self._ctx = self._ctx or self._shared_ctx or zmq.Context()
        cfg = self.config
        self._link = Link(self._ctx, self.endpoint, keys=cfg.keys, key_name=cfg.key_name,
                          max_message_bytes=cfg.max_message_bytes,
                          loop=asyncio.get_running_loop(), on_message=self._on_message,
                          on_refused=self._on_refused)
        self._channel = self._link.channel

    def _move(self, seen: int) -> bool:
        """The router of link number `seen` fell silent: go on with the next configured
        router, unless another request already moved (then `seen` is old). Returns
        whether there is another router to try."""
        if len(self.config.routers) < 2:
            return False
        if seen == self.moves:
            self._link.close()
            self._at = (self._at + 1) % len(self.config.routers)
            self.moves += 1
            self._refused = None
            self.connect()
            self._last_heard = asyncio.get_running_loop().time()  # a full wait for it
            log.info("no answer from the router; trying %s", self.endpoint)
            for queue in self._pending.values():  # what waits there is sent again now
                queue.put_nowait(_MOVED)
        return True

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
                     timeout: float | None = None, request_id: str | None = None,
                     conversation: str | None = None) -> AsyncIterator[Chunk | Done]:
        """Send one chat request; yield its chunks, then its DONE. Raises RequestFailed
        (with the ERROR's code) or RouterUnavailable. `conversation`: a stored one (id or
        title) that `messages` (only the new ones) continue; the DONE names its id."""
        request = Request(
            id=RequestId(request_id or new_id()),
            messages=tuple(messages),
            sampling=sampling or Sampling(),
            session=SessionId(session) if session else None,
            timeout=timeout,
            model=model,
            conversation=conversation,
        )
        queue: asyncio.Queue = asyncio.Queue()
        self._pending[request.id] = queue
        current = request  # what the router was last sent
        finished = False
        try:
            link = self.moves
            self._send(encode(current))
            cursor = StreamCursor(request)
            resends = self.config.resend_on_silence + len(self.config.routers) - 1
            while True:
                try:
                    message = await self._next(queue)
                    if message is _MOVED:
                        if link == self.moves:
                            continue  # sent on the new link already
                        raise RouterUnavailable("moved to another router")
                except RouterUnavailable:
                    if resends <= 0 or self._refused or not cursor.can_resume:
                        raise
                    # The router fell silent: it may have restarted and forgotten the
                    # request. If nothing has streamed yet, send it again as it was; else
                    # ask for the rest of the answer (as the router itself does when a
                    # worker dies mid-answer): nothing is lost or repeated.
                    resends -= 1
                    if cursor.chunks:
                        with contextlib.suppress(RouterUnavailable):
                            self._send(encode(Cancel(current.id)))  # if the old one lives on
                        del self._pending[current.id]
                        current = replace(cursor.resume(RequestId(new_id())),
                                          attempt=current.attempt + 1)
                        self._pending[current.id] = queue
                    else:
                        current = replace(current, attempt=current.attempt + 1)
                    # A later attempt: a worker still running it (or the answer it
                    # continues) for the silent router hands it over; a copy that router
                    # places again, cut off and back, is refused.
                    self._move(link)
                    link = self.moves
                    self._send(encode(current))
                    continue
                match message:
                    case Chunk():
                        if message.seq != cursor.expected_seq:
                            raise ProtocolError(f"chunk {cursor.seq_base + message.seq} arrived "
                                                f"where {cursor.chunks} was due")
                        yield cursor.accept(message)
                    case Done():
                        finished = True
                        yield cursor.final(message)
                        return
                    case Error():
                        finished = True
                        raise RequestFailed(message.message, message.code)
        finally:
            del self._pending[current.id]
            if not finished and self._channel is not None:
                self._send(encode(Cancel(current.id)))

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
        """The router's snapshot of the cluster (as `pichat status --json`); with several
        routers, of the first that answers."""
        return await self._each_router(self._status)

    async def _each_router(self, ask: Callable[[], Awaitable[Any]]) -> Any:
        """`ask()` of the router in use, then of each other one while they are silent."""
        for tries in range(len(self.config.routers), 0, -1):
            link = self.moves
            try:
                return await ask()
            except RouterUnavailable:
                if tries == 1 or self._refused or not self._move(link):
                    raise
        raise AssertionError("unreachable")

    async def _status(self) -> dict[str, Any]:
        future = asyncio.get_running_loop().create_future()
        self._status_waiters.append(future)
        self._send(encode(Status()))
        try:
            return dict(await asyncio.wait_for(asyncio.shield(future),
                                               self.config.silence))
        except TimeoutError:
            raise RouterUnavailable(self._silence_message()) from None
        finally:
            if future in self._status_waiters:
                self._status_waiters.remove(future)

    async def conversations(self, op: str, **fields: Any) -> Any:
        """Ask the router about this client's stored conversations: `op` "list" (offset,
        limit), "get" (id, offset, limit), "rename" (id, title), "delete" (id). Returns
        the router's result; raises RequestFailed or RouterUnavailable. With several
        routers (one shared store), a silent one's question goes to the next, but not a
        "create" (it may have been done)."""
        if op == "create":
            return await self._conversations(op, **fields)
        return await self._each_router(functools.partial(self._conversations, op, **fields))

    async def _conversations(self, op: str, **fields: Any) -> Any:
        ref = new_id()
        future = asyncio.get_running_loop().create_future()
        self._queries[ref] = future
        try:
            self._send(encode(Conversations(op, ref, **fields)))
            return await asyncio.wait_for(asyncio.shield(future),
                                          self.config.silence)
        except TimeoutError:
            raise RouterUnavailable(self._silence_message()) from None
        finally:
            self._queries.pop(ref, None)

    async def wait_for_workers(self, count: int | None = None, *,
                               names: set[str] | None = None, timeout: float = 60.0,
                               check: Callable[[], None] | None = None) -> dict[str, Any]:
        """The router's snapshot once it lists exactly `count` workers (or exactly the
        workers `names`). `check()` runs before each look: raise from it to stop waiting
        (a process that should register died). Raises RouterUnavailable after `timeout`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: dict[str, Any] = {}
        while True:
            if check is not None:
                check()
            try:
                last = await self.status()
            except RouterUnavailable:
                pass  # not up yet, or restarting
            listed = {w["name"] for w in last.get("workers", [])}
            if listed == names if names is not None else len(listed) == count:
                return last
            if loop.time() > deadline:
                raise RouterUnavailable(
                    f"{names or count} workers did not register within {timeout:.0f}s "
                    f"(listed: {sorted(listed)})")
            await asyncio.sleep(0.1)

    async def cancel(self, request_id: str) -> None:
        self._send(encode(Cancel(RequestId(request_id))))

    # --- internals --------------------------------------------------------------------

    async def _next(self, queue: asyncio.Queue) -> Any:
        loop = asyncio.get_running_loop()
        self._last_heard = max(self._last_heard, loop.time())
        while True:
            if not queue.empty():
                return queue.get_nowait()
            remaining = self._last_heard + self.config.silence - loop.time()
            if remaining <= 0:
                raise RouterUnavailable(self._silence_message())
            try:
                # Waiting on a Queue (not on the socket) is safe to time out.
                return await asyncio.wait_for(queue.get(), remaining)
            except TimeoutError:
                continue

    def _silence_message(self) -> str:
        if self._refused:
            return (f"{self._refused}: the router at {self.endpoint} does not accept "
                    f"this client's key ({self.config.key_name}.key must be in the router's "
                    "clients/ directory, and router.key must be the router's)")
        return (f"no answer from the router at {self.endpoint} for "
                f"{self.config.silence:.0f}s: is it running and reachable?")

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
                f"no connection to the router at {self.endpoint}: is it running, and does "
                "it need keys (--keys)?") from None

    def _on_message(self, frames: list[bytes]) -> None:
        self._last_heard = asyncio.get_running_loop().time()
        try:
            message = decode(frames)
        except ProtocolError:
            return  # nothing we can do with it; the request will time out or finish
        match message:
            case Error() if message.id in self._queries:
                future = self._queries[message.id]
                if not future.done():
                    future.set_exception(RequestFailed(message.message, message.code))
            case Conversations():
                future = self._queries.get(message.ref)
                if future is not None and not future.done():
                    future.set_result(message.result)
            case Chunk() | Done() | Error():
                queue = self._pending.get(message.id)
                if queue is not None:
                    queue.put_nowait(message)
                elif isinstance(message, Error) and not message.id:
                    for queue in self._pending.values():
                        queue.put_nowait(message)
                    while self._status_waiters:  # a STATUS refused (a revoked key)
                        future = self._status_waiters.popleft()
                        if not future.done():
                            future.set_exception(RequestFailed(message.message, message.code))
            case Status():
                while self._status_waiters:
                    future = self._status_waiters.popleft()
                    if not future.done():
                        future.set_result(message.cluster)
                        break
            case Heartbeat():
                pass
