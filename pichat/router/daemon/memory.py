"""The router's side of stored conversations (the store itself: pichat/memory).

A REQUEST naming a `conversation` carries only its new messages. The router finds the
owner's conversation (by id, else by title; one of an unknown title is started), puts its
history in front, and sends the request on as its session `conv-ID` (so its turns keep
returning to the worker holding it warm). The answer streams back as any other; the turn
(the new messages and the answer) is stored before the DONE, which names the
conversation, goes out: a client that has the DONE can count on its turn being kept, and
its next turn sees it; a turn that could not be kept (the store out of reach, or the
conversation continued through another router meanwhile) ends with an ERROR instead.
One turn of a conversation at a time: another while one is being answered is refused.

CONVERSATIONS (list, get, rename, delete) is answered from the store. Every store call
runs off the event loop; at most `MAX_PENDING` of them wait at once (more are refused
`busy`), and a page of messages is cut to fit a client's message size.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pichat.config import RouterConfig
from pichat.errors import BadRequest, ErrorCode, PichatError
from pichat.logs import clip
from pichat.memory.store import Conversation, Message, NotFound, Store
from pichat.protocol import (
    MAX_MESSAGES,
    ChatMessage,
    Chunk,
    Conversations,
    Done,
    Error,
    Request,
    RequestId,
    Sampling,
    SessionId,
    Usage,
    encode,
)
from pichat.router.policy.jobs import ReplySink
from pichat.router.policy.scheduler import Scheduler

__all__ = ["Memory", "MAX_PENDING"]

log = logging.getLogger(__name__)

MAX_PENDING = 256
"""Store calls waiting at once (turns being looked up or kept, CONVERSATIONS asked)."""

TITLE_CHARS = 60
TITLE_SYSTEM = "You give each conversation a short title."
TITLE_ASK = ('Conversation\'s first message: "{message}"\n\nWrite a title of at most six words '
             'for this conversation. Reply with the title only, no quotes.')
"""How the model is asked for a title (tried on the default model: "How do I reverse a
list in Python?" -> "Reverse a List in Python"; asked without a system prompt, it
answered the message instead)."""


@dataclass(slots=True)
class _Turn:
    owner: str
    conversation: str
    new: tuple[ChatMessage, ...]
    model: str
    answer: list[str]
    left: int = 0
    """Messages of the history the router left out of the request (`_within`)."""
    untitled: bool = False
    """The conversation's first turn, and no title given: the model writes one."""
    after: int | None = None
    """The messages the conversation held when the turn began: it is kept only if it still
    holds that many (a turn answered meanwhile through another router wins)."""


class TurnSink:
    """The client's sink, with the turn kept in the store before its DONE goes on."""

    __slots__ = ("inner", "memory", "job", "key")

    def __init__(self, inner: ReplySink, memory: Memory, job: RequestId) -> None:
        self.inner = inner
        self.memory = memory
        self.job = job
        self.key = inner.key

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        turn = self.memory.turns.get(self.job)
        if isinstance(message, Chunk):
            if turn is not None:
                turn.answer.append(message.text)
            return self.inner.deliver(message, frames)
        if isinstance(message, Done) and turn is not None:
            self.memory.keep(self.job, message, self.inner)
            return True
        self.memory.end(self.job)
        return self.inner.deliver(message, frames)

    def keepalive(self) -> bool:
        return self.inner.keepalive()


class MemoryHub(Protocol):
    """What the conversation side needs of the router, and all it may touch."""

    config: RouterConfig
    scheduler: Scheduler

    def submit(self, request: Request, sink: ReplySink, *, owner: str = "") -> None: ...

    def send_client(self, client: bytes, frames: list[bytes], copy: bool = True) -> bool: ...


class Memory:
    def __init__(self, router: MemoryHub, store: Store | None) -> None:
        self.router = router
        self.store = store
        self.turns: dict[RequestId, _Turn] = {}
        self._busy: dict[tuple[str, str], RequestId] = {}
        """(owner, conversation id) -> the request answering its turn now."""
        self._tasks: set[asyncio.Task] = set()

    # --- turns ------------------------------------------------------------------------

    def submit(self, request: Request, sink: ReplySink, owner: str) -> None:
        """A REQUEST naming a conversation (the router's submit for the rest)."""
        if self.store is None:
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               "this router keeps no conversations (it runs with --db off)"),
                         None)
            return
        self._spawn(self._begin(request, sink, owner), request.id, sink)

    async def _begin(self, request: Request, sink: ReplySink, owner: str) -> None:
        assert self.store is not None
        name = request.conversation or ""
        if request.id in self.turns:
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               f"request id {request.id!r} is already in use"), None)
            return
        try:
            conv = await self._resolve(owner, name, request)
        except PichatError as exc:
            sink.deliver(Error(request.id, exc.code, str(exc)), None)
            return
        if request.id in conv.turns and self._kept(request, conv, sink):
            return
        key = (owner, conv.id)
        if key in self._busy:
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               "a turn of this conversation is still being answered"), None)
            return
        history = [ChatMessage(m.role, m.content) for m in conv.messages]  # type: ignore[arg-type]
        cfg = self.router.config
        history, left = _within(
            history, chars=cfg.max_prompt_chars - sum(len(m.content) for m in request.messages),
            count=MAX_MESSAGES - len(request.messages),
            size=cfg.max_message_bytes - _ROOM - sum(_size(m) for m in request.messages))
        # The note of what slid out (pichat/worker/engine/summary.py), counted from the
        # messages sent.
        memory = conv.memory or None
        full = replace(request, messages=(*history, *request.messages), conversation=None,
                       session=SessionId(f"conv-{conv.id}"), memory=memory,
                       remembered=max(0, conv.remembered - left) if memory else 0)
        self._busy[key] = request.id
        self.turns[request.id] = _Turn(owner, conv.id, request.messages,
                                       request.model or "", [], left,
                                       untitled=not conv.title and not conv.total,
                                       after=conv.total)
        self.router.submit(full, TurnSink(sink, self, request.id), owner=owner)

    def _kept(self, request: Request, conv: Conversation, sink: ReplySink) -> bool:
        """This turn was kept already (its client sent it again through this router after
        another had answered and kept it, the answer lost on the way): the kept answer is
        its answer, not a second one on top of the first."""
        asked = request.messages[-1].content if request.messages else None
        found = conv.messages
        for i in range(len(found) - 2, -1, -1):
            if found[i].role == "user" and found[i].content == asked and \
                    found[i + 1].role == "assistant":
                answer = found[i + 1]
                break
        else:
            return False
        log.info("req=%s: kept already in conversation %s (answered through another "
                 "router): its kept answer sent again", request.id, conv.id)
        sink.deliver(Chunk(request.id, 0, answer.content), None)
        sink.deliver(Done(request.id, answer.worker or "-", "stop", Usage(),
                          conversation=conv.id), None)
        return True

    async def _lookup(self, owner: str, name: str, offset: int = 0,
                      limit: int | None = None) -> Conversation:
        """The owner's conversation of this id, else of this title, with its messages from
        `offset` (`limit` of them; None: all); raises NotFound."""
        assert self.store is not None
        try:
            return await self.store.get(owner, name, offset, limit)
        except NotFound:
            found = await self.store.find(owner, name)
            if found is None:
                raise
            return await self.store.get(owner, found.id, offset, limit)

    async def _resolve(self, owner: str, name: str, request: Request) -> Conversation:
        """The owner's conversation of this id or title; a new one of this title."""
        assert self.store is not None
        try:
            return await self._lookup(owner, name)
        except NotFound:
            log.info("req=%s: a new conversation %r", request.id, clip(name, 60))
            return await self.store.create(owner, title=name, model=request.model or "")

    def keep(self, job: RequestId, done: Done, sink: ReplySink) -> None:
        """The answer is done: store the turn, then pass the DONE on."""
        turn = self.turns.get(job)
        assert turn is not None and self.store is not None
        store = self.store

        async def store_then_deliver() -> None:
            title_from = ""
            lost: Error | None = None
            try:
                if done.finish != "cancelled":
                    messages = tuple(Message(m.role, m.content) for m in turn.new) + (
                        Message("assistant", "".join(turn.answer),
                                model=turn.model or "", worker=done.worker),)
                    try:
                        await store.append(turn.owner, turn.conversation, messages,
                                           after=turn.after, turn=job)
                    except PichatError as exc:  # the client must not count on it: no DONE
                        lost = Error(job, exc.code, f"the answer was not kept in conversation "
                                                    f"{turn.conversation}: {exc}")
                        raise
                if done.memory:
                    await store.remember(turn.owner, turn.conversation, done.memory,
                                         done.remembered + turn.left)
                if turn.untitled and done.finish != "cancelled":
                    title_from = next((m.content for m in turn.new if m.role == "user"), "")
                    await store.rename(turn.owner, turn.conversation, _excerpt(title_from))
            except PichatError as exc:
                log.warning("req=%s: the turn was answered but not kept in conversation %s: "
                            "%s", job, turn.conversation, exc)
            finally:
                self.end(job)
                sink.deliver(lost or replace(done, conversation=turn.conversation,
                                             memory=None, remembered=0), None)
            if title_from:
                self._entitle(turn, title_from)

        self._spawn(store_then_deliver(), job, sink, limit=False)

    def _entitle(self, turn: _Turn, first: str) -> None:
        """Have the model write the conversation's title from its first message, off the
        hot path: only while no request waits, after the turn's DONE; it replaces the
        excerpt the conversation was given meanwhile (unless renamed since)."""
        if not first or self.router.scheduler.queue_depth or self.store is None:
            return
        store, excerpt = self.store, _excerpt(first)
        ask = Request(RequestId(f"title-{turn.conversation}-{secrets.token_hex(4)}"),
                      (ChatMessage("system", TITLE_SYSTEM),
                       ChatMessage("user", TITLE_ASK.format(message=_cut(first, 600)))),
                      Sampling(temperature=0.0, max_tokens=16), model=turn.model or None)

        def written(text: str) -> None:
            title = _title(text)
            if title and not self.busy:
                self._spawn(retitle(title), None, None, limit=False)

        async def retitle(title: str) -> None:
            try:
                conv = await store.get(turn.owner, turn.conversation, 0, 0)
                if conv.title == excerpt:
                    await store.rename(turn.owner, turn.conversation, title)
            except PichatError as exc:  # deleted meanwhile, say
                log.debug("conversation %s: no title kept: %s", turn.conversation, exc)

        self.router.submit(ask, _Collect(written), owner=turn.owner)

    def end(self, job: RequestId) -> None:
        turn = self.turns.pop(job, None)
        if turn is not None:
            self._busy.pop((turn.owner, turn.conversation), None)

    # --- CONVERSATIONS ----------------------------------------------------------------

    def on_query(self, client: bytes, query: Conversations, owner: str) -> None:
        r = self.router
        if self.store is None:
            r.send_client(client, encode(Error(query.ref, ErrorCode.BAD_REQUEST,
                                               "this router keeps no conversations")))
            return
        self._spawn(self._answer(client, query, owner), RequestId(query.ref), None,
                    client=client)

    async def _answer(self, client: bytes, query: Conversations, owner: str) -> None:
        r = self.router
        try:
            result = await self.query(owner, query)
        except PichatError as exc:
            r.send_client(client, encode(Error(query.ref, exc.code, str(exc))))
            return
        r.send_client(client, encode(replace(query, result=result)))

    async def query(self, owner: str, query: Conversations) -> Any:
        """The answer to `query` about `owner`'s conversations (the same for ZeroMQ and
        HTTP clients). Raises PichatError (NotFound, LimitReached, busy, none kept)."""
        if self.store is None:
            raise BadRequest("this router keeps no conversations (it runs with --db off)")
        match query.op:
            case "list":
                return [_summary(s) for s in
                        await self.store.list(owner, query.limit, query.offset)]
            case "get":
                conv = await self._lookup(owner, query.id, query.offset, query.limit)
                return _page(conv, query.offset, self.router.config.max_message_bytes // 2)
            case "create":
                conv = await self.store.create(owner, title=query.title)
                return _page(conv, 0, 0)
            case "rename":
                conv = await self._lookup(owner, query.id, 0, 0)
                await self.store.rename(owner, conv.id, query.title)
                return {"id": conv.id, "title": query.title}
            case _:
                conv = await self._lookup(owner, query.id, 0, 0)
                return {"id": conv.id, "deleted": await self.store.delete(owner, conv.id)}

    # --- internals --------------------------------------------------------------------

    def _spawn(self, work: Coroutine[Any, Any, None], job: RequestId | None,
               sink: ReplySink | None, *, limit: bool = True, client: bytes = b"") -> None:
        if limit and self.busy:
            work.close()
            busy = Error(job or "", ErrorCode.BUSY, "the conversation store is busy; retry")
            if sink is not None:
                sink.deliver(busy, None)
            else:
                self.router.send_client(client, encode(busy))
            return
        task = asyncio.get_running_loop().create_task(
            work if sink is None else self._heartbeating(work, sink))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _heartbeating(self, work: Coroutine[Any, Any, None], sink: ReplySink) -> None:
        """`work`, the client heartbeated meanwhile: a store slow to answer (an etcd
        member cut off, an election) must not look like a dead router to it, or it would
        send the turn again through another router while this one still answers it."""
        async def beat() -> None:
            while True:
                await asyncio.sleep(self.router.config.heartbeat_interval)
                if not sink.keepalive():
                    return

        beating = asyncio.get_running_loop().create_task(beat())
        try:
            await work
        finally:
            beating.cancel()

    @property
    def busy(self) -> bool:
        """As many store calls wait as may: refuse more (`busy`)."""
        return len(self._tasks) >= MAX_PENDING

    @property
    def path(self) -> str:
        return str(getattr(self.store, "path", ""))

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=10)
        if self.store is not None:
            await self.store.close()
            self.store = None


_ROOM = 256 * 1024
"""Bytes of a request to a worker left for what is not the history (tools, the note...)."""


def _size(message: ChatMessage) -> int:
    """Bytes of `message` in a request (its text as UTF-8, and room for its keys)."""
    return len(message.content.encode("utf-8", "surrogatepass")) + 32


def _within(history: list[ChatMessage], *, chars: int, count: int,
            size: int) -> tuple[list[ChatMessage], int]:
    """`history` with its oldest whole turns (after the system messages) left out until
    it has at most `chars` characters, `count` messages and `size` bytes: what a router
    accepts in one request and a worker decodes (the worker slides the rest to fit its
    context; the store keeps it all); and how many messages left."""
    head = 0
    while head < len(history) and history[head].role == "system":
        head += 1
    total = sum(len(m.content) for m in history)
    total_size = sum(map(_size, history))
    cut = head

    def over() -> bool:
        return total > chars or len(history) - (cut - head) > count or total_size > size

    while over() and cut < len(history):
        total -= len(history[cut].content)
        total_size -= _size(history[cut])
        cut += 1
        while cut < len(history) and history[cut].role != "user":  # whole turns
            total -= len(history[cut].content)
            total_size -= _size(history[cut])
            cut += 1
    return history[:head] + history[cut:], cut - head


class _Collect:
    """A sink for the router's own request: the text, to `then`, once it is done."""

    def __init__(self, then: Callable[[str], None]) -> None:
        self.key = object()
        self._then = then
        self._parts: list[str] = []

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        if isinstance(message, Chunk):
            self._parts.append(message.text)
        elif isinstance(message, Done) and message.finish != "cancelled":
            self._then("".join(self._parts))
        return True

    def keepalive(self) -> bool:
        return True


def _title(text: str) -> str:
    """A model's answer as a title: its first line, without quotes or a label."""
    line = next((x for x in text.strip().splitlines() if x.strip()), "")
    line = re.sub(r"^(title|titre)\s*:\s*", "", line.strip(), flags=re.IGNORECASE)
    line = line.strip().strip("\"'*#`“”").strip()
    return _cut(line, TITLE_CHARS)


def _excerpt(message: str) -> str:
    """A conversation's title until the model's: the start of its first message."""
    return _cut(" ".join(message.split()), TITLE_CHARS)


def _cut(text: str, n: int) -> str:
    return text if len(text) <= n else text[:n - 1].rstrip() + "\u2026"


def _summary(s: Any) -> dict[str, Any]:
    return {"id": s.id, "title": s.title, "model": s.model, "created": s.created,
            "updated": s.updated, "messages": s.messages}


def _page(conv: Conversation, offset: int, max_chars: int) -> dict[str, Any]:
    """The conversation with its page of messages (from `offset`), cut to `max_chars`."""
    messages, size = [], 0
    for m in conv.messages:
        size += len(m.content) + 64
        if messages and size > max_chars:
            break
        messages.append({"role": m.role, "content": m.content, "created": m.created,
                         "model": m.model, "worker": m.worker})
    return {"id": conv.id, "title": conv.title, "model": conv.model,
            "created": conv.created, "updated": conv.updated, "memory": conv.memory,
            "remembered": conv.remembered, "total": conv.total, "offset": offset,
            "messages": messages}
