"""Which conversation's KV state lives where, inside one worker.

A worker has a few slots (one backend `Context` each) and many more conversations than
slots. A conversation resident in a slot continues there and evaluates only its new
tokens. When a slot is needed for another conversation, the resident one's KV state is
saved into the `SessionStore` (RAM, least recently used dropped first within a byte
budget) and restored when that conversation comes back, to whichever slot is free.

A prompt's start may also be held by another slot (one system prompt for everyone): the
slot then takes a copy of those cells (`Context.adopt`) instead of reading the tokens
again, subject to the same rule across owners as below.

KV state is reused across owners (the router's tag of who sent a request) only for the
leading system messages: a context another owner left is truncated to the longest run of
whole system messages the new prompt shares with it (a common system prompt, the tools'
descriptions), never to a token inside a message nor past the first user message, so
`cached_tokens`, `usage` and the time to first token cannot confirm a guess of another
user's own message, neither token by token nor whole. (A system prompt is what many share
by design: one owner can still tell whether another uses the same one.) With `isolate`
nothing is reused across owners at all.

The router leases each session to this worker; the lease is kept with the session and
announced back in READY, the router's proof that it placed the session here.

Threading: `acquire` and `release` run on the event loop; `run` runs in the slot's own
thread. The store and the eviction list are shared and guarded by a lock.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from pichat.errors import BadRequest, ContextTooLong
from pichat.protocol import MAX_LISTED_SESSIONS, ChatMessage, Request, SessionId
from pichat.worker.engine import shift, summary, tools
from pichat.worker.engine.backend import Context, Generation, Model, Room, SavedState, common_prefix
from pichat.worker.engine.summary import Note, Notes
from pichat.worker.engine.textstream import TextStream
from pichat.worker.engine.toolfit import Fitter
from pichat.worker.store.disk import DiskStore
from pichat.worker.store.window import slide

__all__ = ["SessionStore", "Slot", "SlotManager", "message_boundary", "MIN_SHARED"]

log = logging.getLogger(__name__)

MIN_SHARED = 16
"""A slot takes another slot's cells for a common prompt start only if that saves reading
at least this many tokens (the copy costs about one decoding step)."""


class SessionStore:
    """Saved KV states by session, least recently used dropped first to stay in budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.nbytes = 0
        self._states: OrderedDict[SessionId, SavedState] = OrderedDict()

    def put(self, session: SessionId, state: SavedState) -> list[SessionId]:
        """Store `state`; returns the sessions dropped to make room (`session` itself if
        it alone exceeds the budget)."""
        self.take(session)
        if state.nbytes > self.budget:
            return [session]
        dropped: list[SessionId] = []
        while self._states and self.nbytes + state.nbytes > self.budget:
            old, old_state = self._states.popitem(last=False)
            self.nbytes -= old_state.nbytes
            dropped.append(old)
        self._states[session] = state
        self.nbytes += state.nbytes
        return dropped

    def take(self, session: SessionId) -> SavedState | None:
        state = self._states.pop(session, None)
        if state is not None:
            self.nbytes -= state.nbytes
        return state

    def peek(self, session: SessionId) -> SavedState | None:
        return self._states.get(session)

    def sessions(self) -> list[SessionId]:
        return list(self._states)

    def states(self) -> list[SavedState]:
        return list(self._states.values())

    def __len__(self) -> int:
        return len(self._states)


@dataclass(slots=True)
class Slot:
    index: int
    context: Context
    resident: SessionId | None = None
    """The conversation whose KV the context holds (None: an anonymous request's)."""
    owner: str | None = None
    """Whose tokens the context holds (the router's owner tag)."""
    busy: bool = False
    last_used: int = 0


class SlotManager:
    def __init__(self, model: Model, slots: int, threads: int, cache_bytes: int,
                 disk: DiskStore | None = None, *, shift: bool = True, block: int = 0,
                 memory: str = "summary", embedding_only: bool = False) -> None:
        self.model = model
        self.embedding_only = embedding_only
        """The model is an embedding model: chat requests are refused."""
        self.shift = shift
        """Context shift: a sliding conversation's kept turns are moved, not read again,
        and a long answer goes past the end of the context."""
        self.block = block
        """Tokens that leave at once when a conversation slides (0: a quarter of n_ctx)."""
        self.memory = memory
        """`summary`: a note of what slides out stays after the system prompt; `none`."""
        self.notes = Notes()
        self.toolfit = Fitter(count=lambda m, t: len(model.chat_tokens(m, t)),
                              tokens=lambda text: len(model.text_tokens(text)),
                              embed=lambda texts: model.embed(texts)[0])
        """Which of a request's tools its prompt holds when they do not all fit."""
        per_slot = max(1, threads // slots)
        self.slots = [Slot(i, model.new_context(per_slot)) for i in range(slots)]
        self.store = SessionStore(cache_bytes)
        self.disk = disk
        """Every conversation's state after each turn, kept across restarts (optional)."""
        self._lock = threading.Lock()
        self._switch = threading.Lock()
        self._evicted: list[SessionId] = []
        self._clock = itertools.count(1)
        self._leases: dict[SessionId, str] = {}
        """The router's lease of each warm session (only sessions warm here)."""
        if disk is not None:
            self._leases.update((SessionId(s), lease) for s, lease in disk.sessions() if lease)

    # --- event loop side --------------------------------------------------------------

    def acquire(self, session: SessionId | None) -> Slot | None:
        """Reserve a free slot for a request of `session`: the slot that holds it if free,
        else an unused one, else the least recently used. None if all are busy."""
        free = [s for s in self.slots if not s.busy]
        if not free:
            return None
        home = next((s for s in free if session is not None and s.resident == session), None)
        slot = home or min(free, key=lambda s: (s.resident is not None, s.last_used))
        slot.busy = True
        slot.last_used = next(self._clock)
        return slot

    def release(self, slot: Slot) -> None:
        slot.busy = False

    def rename(self, slot: Slot, session: SessionId | None, lease: str | None) -> None:
        """The conversation `slot` holds goes on as `session`, leased with `lease` (a
        continuation through another router took its answer over)."""
        with self._lock:
            if slot.resident is not None:
                self._leases.pop(slot.resident, None)
            slot.resident = session
            if session is not None and lease is not None:
                self._leases[session] = lease

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def kv_usage(self) -> tuple[int, int]:
        """(tokens of KV the slots hold, bytes of the session store)."""
        return sum(len(s.context.tokens()) for s in self.slots), self.store.nbytes

    def warm_sessions(self) -> list[SessionId]:
        with self._lock:
            stored = self.store.sessions()[::-1]
        resident = [s.resident for s in self.slots if s.resident is not None]
        on_disk = [SessionId(s) for s, _ in reversed(self.disk.sessions())] if self.disk else []
        # What one READY may list: the most recently used first.
        return list(dict.fromkeys([*resident, *stored, *on_disk]))[:MAX_LISTED_SESSIONS]

    def warm_leases(self) -> list[tuple[str, str]]:
        """(session, lease) of the warm sessions the router leased to this worker."""
        return [(s, self._leases[s]) for s in self.warm_sessions() if s in self._leases]

    def take_evicted(self) -> list[SessionId]:
        """Sessions no longer warm here since the last call (for the router's affinity)."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
            stored = set(self.store.sessions())
        if self.disk is not None:  # still warm on disk; gone when the disk drops them
            evicted = [s for s in evicted if not self.disk.has(s)]
            evicted += [SessionId(s) for s in self.disk.take_dropped() if s not in stored]
        resident = {s.resident for s in self.slots}
        gone = [s for s in dict.fromkeys(evicted) if s not in resident]
        for session in gone:
            self._leases.pop(session, None)
        return gone

    def acquire_resident(self, session: SessionId) -> Slot | None:
        """Hold the free slot where `session` lives, if any (to save its state)."""
        slot = next((s for s in self.slots if s.resident == session and not s.busy), None)
        if slot is not None:
            slot.busy = True
        return slot

    def accept(self, session: str, state: SavedState) -> None:
        """Keep a state another worker sent: in the session store, where the next request
        of its session finds it (a copy a free slot held is older: it is let go)."""
        sid = SessionId(session)
        for slot in self.slots:
            if slot.resident == sid and not slot.busy:
                slot.resident = None
        with self._lock:
            self._evicted += [s for s in self.store.put(sid, state) if s != sid]

    # --- slot thread side -------------------------------------------------------------

    def save_slot(self, slot: Slot) -> SavedState | None:
        """The state of the conversation `slot` holds (on the slot's thread)."""
        if slot.resident is None:
            return None
        return replace(slot.context.save(), owner=slot.owner)

    def stored_state(self, session: SessionId) -> SavedState | None:
        """The session's state from the store or the disk, left where it is."""
        with self._lock:
            state = self.store.peek(session)
        if state is None and self.disk is not None:
            state = self.disk.load(session)
        return state

    def run(self, slot: Slot, request: Request, out: TextStream,
            cancelled: threading.Event) -> Generation:
        """Generate `request` in `slot` (call from the slot's thread only)."""
        started = time.perf_counter()
        if request.embed:
            vectors, read = self.model.embed(request.embed)
            return Generation("stop", read, 0, 0, (time.perf_counter() - started) * 1000, 0.0,
                              embeddings=tuple(vectors))
        if self.embedding_only:
            raise BadRequest("this worker serves an embedding model: embeddings only")
        if request.session is not None and request.lease is not None:
            self._leases[request.session] = request.lease
        if request.prompt is not None:
            prompt = self.model.text_tokens(request.prompt)
        else:
            prompt = self.model.chat_tokens(request.messages, request.tools)
        outside = next((t for t in request.continuation if t >= self.model.n_vocab), None)
        if outside is not None:
            raise BadRequest(f"continuation token {outside} is outside the model's vocabulary "
                             f"({self.model.n_vocab} tokens)")
        n_ctx = self.model.n_ctx
        reserve = min(request.sampling.max_tokens, n_ctx // 4)
        left_out: tuple[str, ...] = ()
        if request.tools and request.prompt is None and request.truncate and \
                len(prompt) + len(request.continuation) + reserve > n_ctx:
            request, left_out = self._fit_tools(request, reserve)
            if left_out:
                prompt = self.model.chat_tokens(request.messages, request.tools)
        dropped, note, keep = 0, None, 1
        if request.prompt is None:
            if request.truncate and len(prompt) + len(request.continuation) + reserve > n_ctx:
                prompt, dropped, note, keep = self._fit(slot, request, prompt, reserve,
                                                        cancelled)
            elif self.shift and request.truncate and \
                    len(prompt) + len(request.continuation) + request.sampling.max_tokens > n_ctx:
                # (only an answer that can reach the context's end needs it)
                keep = len(self.model.prefix_tokens(
                    request.messages, summary.head_of(request.messages), request.tools))
        prompt = [*prompt, *request.continuation]
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) >= self.model.n_ctx:
            raise ContextTooLong(
                f"the prompt is {len(prompt)} tokens but the model's context holds "
                f"{self.model.n_ctx} (prompt and answer together); shorten the conversation"
            )
        sampling = request.sampling
        grammar, trigger = tools.grammar_for(request, self.model.tool_family)
        if grammar:
            sampling = replace(sampling, grammar=grammar, grammar_trigger=trigger)
        with self._switch:  # one slot's owner and tokens change while no other looks
            self._bring_in(slot, request, prompt)
        room = Room(max(1, keep), self.block or n_ctx // 4) \
            if self.shift and request.truncate else None
        try:
            result = slot.context.generate(prompt, sampling, out, cancelled,
                                           resume=len(request.continuation), room=room)
            out.close()
            if self.disk is not None and request.session is not None:
                # Written behind, on the disk's own thread: the answer is already out.
                state = replace(slot.context.save(), owner=request.owner)
                self.disk.put(request.session, state, self._leases.get(request.session))
        except Exception:
            slot.context.clear()
            slot.resident = slot.owner = None
            raise
        # Session switch (save/restore) and a note written first count as prompt time:
        # they are part of the wait.
        switch_ms = (time.perf_counter() - started) * 1000 - result.prompt_ms - result.generate_ms
        if switch_ms > 0:
            result = replace(result, prompt_ms=result.prompt_ms + switch_ms)
        return replace(result, dropped_tokens=dropped + result.dropped_tokens, note=note,
                       tools_left_out=left_out)

    def _fit_tools(self, request: Request, reserve: int) -> tuple[Request, tuple[str, ...]]:
        """`request` with only the tools that fit beside its conversation, the most relevant
        to it (pichat/worker/engine/toolfit.py), and the names of those left out."""
        n_ctx = self.model.n_ctx - len(request.continuation)
        note_room = self._note_room(n_ctx)
        named = request.tool_choice.removeprefix("function:") \
            if request.tool_choice.startswith("function:") else ""
        choice = self.toolfit.fit(request.messages, request.tools,
                                  room=n_ctx - reserve - note_room, owner=request.owner,
                                  session=request.session, named=named)
        if not choice.left_out:
            return request, ()
        if not choice.tools and request.tool_choice in ("required", f"function:{named}"):
            raise ContextTooLong(
                f"the conversation leaves no room in the model's context ({self.model.n_ctx} "
                f"tokens, {reserve} kept for the answer) for the tool it must call: shorten "
                "the system prompt or the newest message, or start the worker with a larger "
                "--ctx")
        log.info("req=%s session=%s: %d of the request's tools left out to fit the "
                 "context (the least relevant)", request.id, request.session,
                 len(choice.left_out))
        return replace(request, tools=choice.tools), choice.left_out

    def _note_room(self, n_ctx: int) -> int:
        """The context a conversation's note may take (none without `--memory summary`)."""
        budget = summary.budget(n_ctx) if self.memory == "summary" else 0
        return budget + summary.HEADER_TOKENS if budget else 0

    def _fit(self, slot: Slot, request: Request, prompt: list[int], reserve: int,
             cancelled: threading.Event) -> tuple[list[int], int, Note | None, int]:
        """A conversation too long for the context slides (pichat/worker/store/window.py), with
        a note of what leaves (pichat/worker/engine/summary.py): (the prompt, tokens left out,
        the note if one was written now, the tokens of its system prompt)."""
        messages = request.messages
        head = summary.head_of(messages)
        n_ctx = self.model.n_ctx - len(request.continuation)
        count = lambda m: len(self.model.chat_tokens(m, request.tools))  # noqa: E731
        current = self._current_note(request)
        room = self._note_room(n_ctx) if request.session is not None or current else 0
        noting = bool(room)
        try:
            window = slide(messages, count=count, reserve=reserve, block=self.block or n_ctx // 4,
                           n_ctx=n_ctx - room)
        except ContextTooLong:
            if len(prompt) + len(request.continuation) >= self.model.n_ctx:
                raise
            return prompt, 0, None, len(self.model.prefix_tokens(messages, head, request.tools))
        cut, new = window.dropped, None
        if current is not None and cut <= current.covers < len(messages) - head - 1 \
                and messages[head + current.covers].role == "user":
            cut = current.covers  # the note stands for these: leave them all out
        elif noting:
            new = self._write_note(slot, request, current, head, cut, cancelled)
            current = new or current
        note = current.text if current is not None else None
        kept = (*summary.with_note(messages[:head], note), *messages[head + cut:])
        while note and count(kept) + reserve > n_ctx:  # a note past its room (a client's?)
            note = note[:len(note) // 2].rstrip()
            kept = (*summary.with_note(messages[:head], note), *messages[head + cut:])
        if new is not None and new.text != note:
            new = replace(new, text=note or "")
        dropped = window.dropped_tokens if cut == window.dropped else \
            len(prompt) - count((*messages[:head], *messages[head + cut:]))
        log.info("req=%s session=%s: the %d oldest messages (~%d tokens) left out to fit the "
                 "context%s", request.id, request.session, cut, dropped,
                 ", a note of them kept" if note else "")
        return (self.model.chat_tokens(kept, request.tools), dropped, new,
                len(self.model.prefix_tokens(kept, head if head else int(bool(note)),
                                             request.tools)))

    def _current_note(self, request: Request) -> Note | None:
        """The note of the conversation's start that is in effect: the router's (a stored
        conversation), else the one this worker last wrote or was sent for its session."""
        if self.memory != "summary":
            return None
        messages = request.messages
        head = summary.head_of(messages)
        if request.memory:
            covers = min(request.remembered, len(messages) - head)
            return Note(summary.clean(request.memory), covers,
                        summary.digest(messages[head:head + covers]))
        if request.session is None:
            return None
        with self._lock:
            return self.notes.get(request.owner or "", request.session, messages)

    def _write_note(self, slot: Slot, request: Request, current: Note | None, head: int,
                    cut: int, cancelled: threading.Event) -> Note | None:
        """Have the model write a note of the conversation before its first `cut`
        messages (after the system ones) leave, in `slot`, where the conversation's KV
        state ends (pichat/worker/engine/summary.py). None if it cannot fit or is cancelled."""
        messages = request.messages
        how = summary.sampling(self.model.n_ctx)
        limit = self.model.n_ctx - how.max_tokens - 1
        # As much of the conversation as the context holds with the note (whole turns: it
        # ends before a user message, as the instruction is one).
        ends = [i for i, m in enumerate(messages) if m.role == "user" and i >= head + cut]
        for end in reversed(ends):
            try:
                asked = self.model.chat_tokens(summary.request_messages(messages, current, end),
                                               request.tools)
            except BadRequest:  # a template that will not take the instruction
                return None
            if len(asked) <= limit:
                break
        else:  # noted as nothing, so the turns until the next slide do not try again
            log.info("req=%s: no room to write a note of the oldest messages", request.id)
            if request.session is not None:
                with self._lock:
                    self.notes.put(request.owner or "", request.session,
                                   Note("", cut, summary.digest(messages[head:head + cut])))
            return None
        with self._switch:
            self._bring_in(slot, request, asked)
        written = TextStream(lambda text, tokens: None, flush_tokens=1 << 20,
                             flush_interval=1e9)
        result = slot.context.generate(asked, how, written, cancelled)
        written.close()
        text = summary.clean(written.text)
        if result.finish == "cancelled" or not text:
            return None
        note = Note(text, cut, summary.digest(messages[head:head + cut]))
        if request.session is not None:
            with self._lock:
                self.notes.put(request.owner or "", request.session, note)
        log.info("req=%s session=%s: a note of the %d messages sliding out (%d tokens read, "
                 "%d written, %.1f s)", request.id, request.session, cut,
                 result.prompt_tokens - result.cached_tokens, result.completion_tokens,
                 (result.prompt_ms + result.generate_ms) / 1000)
        return note

    def _reusable(self, held: Sequence[int], prompt: Sequence[int]) -> int:
        """How many tokens of `prompt` a context holding `held` can give (moving cells
        where the conversation slid, with context shift on)."""
        common = common_prefix(held, prompt)
        splice = shift.plan(held, prompt) if self.shift else None
        return max(common, splice.reused) if splice else common

    def _bring_in(self, slot: Slot, request: Request, prompt: Sequence[int]) -> None:
        """Make `slot`'s context hold the best state available for `request`'s prompt,
        and no more of another owner's tokens than may be shared."""
        session = request.session
        ctx = slot.context
        keep = self._shareable(slot, request, prompt)
        # Only the conversation's own state may be spliced (its start slid out): cells
        # of another conversation moved in around text read after them would make the
        # model go on with that text as if it had written it.
        own = session is not None and slot.resident == session
        if session is None or slot.resident != session:
            if slot.resident is not None:
                saved = replace(ctx.save(), owner=slot.owner)
                with self._lock:
                    self._evicted += self.store.put(slot.resident, saved)
                log.debug("session=%s saved (%d tokens, %.1f MB)", slot.resident,
                          len(saved.tokens), saved.nbytes / 1e6)
            slot.resident = session
            if session is not None:
                with self._lock:
                    state = self.store.peek(session)
                    # Restore only if it beats what the context may already share with the
                    # prompt (e.g. a common system prompt).
                    if state is not None and self._reusable(state.tokens, prompt) > keep:
                        self.store.take(session)
                    else:
                        state = None
                if state is None and self.disk is not None:  # after a restart, say
                    state = self.disk.load(session)
                    if state is not None and self._reusable(state.tokens, prompt) <= keep:
                        state = None
                if state is not None:
                    restored = own = ctx.restore(state)
                    slot.owner = state.owner if restored else None
                    keep = common_prefix(ctx.tokens(), prompt) if restored else 0
                    if not restored:
                        log.warning("session=%s: the backend refused its saved state; "
                                    "starting cold", session)
            if not own:
                keep = self._borrow_saved(slot, request, prompt, keep)
        if self.shift and own and slot.owner == request.owner and keep < len(ctx.tokens()):
            keep = max(keep, ctx.splice(prompt))  # the conversation slid: move its cells
        if keep < len(ctx.tokens()):
            ctx.truncate(keep)
        self._share_prefix(slot, request, prompt, keep)
        slot.owner = request.owner

    def _share_prefix(self, slot: Slot, request: Request, prompt: Sequence[int],
                      keep: int) -> int:
        """If another slot holds a longer start of `prompt` than `slot` does (one system
        prompt for everyone), let `slot` take a copy of those KV cells instead of
        evaluating them, within what the other slot's owner may share with this request.
        Returns what `slot` now holds."""
        best, donor = keep + MIN_SHARED - 1, None
        for other in self.slots:
            if other is slot or common_prefix(other.context.tokens(), prompt) <= best:
                continue
            n = min(self._shareable(other, request, prompt), len(prompt) - 1)
            if n > best:
                best, donor = n, other
        if donor is None:
            return keep
        held = slot.context.adopt(donor.context, prompt[:best])
        if held > keep:
            log.debug("slot %d took %d prompt tokens from slot %d", slot.index, held,
                      donor.index)
            return held
        return keep

    def _borrow_saved(self, slot: Slot, request: Request, prompt: Sequence[int],
                      keep: int) -> int:
        """If the saved state of another conversation holds a longer start of `prompt`
        than `slot` and every other slot do (the tool list a client sends with each of a
        user's chats, after its title task took the slot), restore a copy of it and keep
        only that start, within what its owner may share with this request. Returns what
        `slot` now holds."""
        best = keep + MIN_SHARED - 1
        for other in self.slots:  # a slot's cells are copied cheaper (_share_prefix)
            if other is not slot:
                best = max(best, self._shareable(other, request, prompt))
        found = None
        with self._lock:
            for state in self.store.states():
                if common_prefix(state.tokens, prompt) <= best:
                    continue
                n = min(self._may_share(state.tokens, state.owner, request, prompt),
                        len(prompt) - 1)
                if n > best:
                    best, found = n, state
        if found is None:
            return keep
        if not slot.context.restore(found):
            log.warning("req=%s: the backend refused a saved state to share", request.id)
            slot.context.truncate(0)
            return 0
        slot.context.truncate(best)
        log.debug("req=%s: %d prompt tokens from a saved state", request.id, best)
        return best

    def _shareable(self, slot: Slot, request: Request, prompt: Sequence[int]) -> int:
        """How many of the context's tokens `request` may reuse."""
        return self._may_share(slot.context.tokens(), slot.owner, request, prompt)

    def _may_share(self, held: Sequence[int], owner: str | None, request: Request,
                   prompt: Sequence[int]) -> int:
        """How many of the tokens `held` (read for `owner`) `request` may reuse."""
        common = common_prefix(held, prompt)
        if owner == request.owner or common == 0:
            return common
        if request.isolate or not request.messages:
            return 0
        # Across owners only the leading system messages: a run of whole messages that
        # went further would confirm a guess of another user's own message.
        system = 0
        while system < len(request.messages) and request.messages[system].role == "system":
            system += 1
        if system == 0:
            return 0
        return message_boundary(self.model, request.messages[:system], prompt, common,
                                request.tools)


def message_boundary(model: Model, messages: Sequence[ChatMessage], prompt: Sequence[int],
                     limit: int, tools: str = "") -> int:
    """The length of the longest run of whole messages at the start of `prompt` that is
    at most `limit` tokens long (0 if none): found by bisection over the number of
    messages, checked against the prompt's own tokens."""
    lo, hi = 0, len(messages)
    while lo < hi:  # the largest k whose rendering is at most `limit` tokens
        k = (lo + hi + 1) // 2
        if len(model.prefix_tokens(messages, k, tools)) <= limit:
            lo = k
        else:
            hi = k - 1
    for k in range(lo, 0, -1):
        tokens = model.prefix_tokens(messages, k, tools)
        if len(tokens) <= limit and list(prompt[:len(tokens)]) == tokens:
            return len(tokens)
    return 0
