"""Which conversation's KV state lives where, inside one worker.

A worker has a few slots (one backend `Context` each) and many more conversations than
slots. A conversation resident in a slot continues there and evaluates only its new
tokens. When a slot is needed for another conversation, the resident one's KV state is
saved into the `SessionStore` (RAM, least recently used dropped first within a byte
budget) and restored when that conversation comes back, to whichever slot is free.

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
from dataclasses import dataclass

from pichat.errors import BadRequest, ContextTooLong
from pichat.protocol import Request, SessionId
from pichat.worker.backend import Context, Generation, Model, SavedState, common_prefix
from pichat.worker.textstream import TextStream

__all__ = ["SessionStore", "Slot", "SlotManager"]

log = logging.getLogger(__name__)


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

    def __len__(self) -> int:
        return len(self._states)


@dataclass(slots=True)
class Slot:
    index: int
    context: Context
    resident: SessionId | None = None
    """The conversation whose KV the context holds (None: an anonymous request's)."""
    busy: bool = False
    last_used: int = 0


class SlotManager:
    def __init__(self, model: Model, slots: int, threads: int, cache_bytes: int) -> None:
        self.model = model
        per_slot = max(1, threads // slots)
        self.slots = [Slot(i, model.new_context(per_slot)) for i in range(slots)]
        self.store = SessionStore(cache_bytes)
        self._lock = threading.Lock()
        self._evicted: list[SessionId] = []
        self._clock = itertools.count(1)

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

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    def warm_sessions(self) -> list[SessionId]:
        with self._lock:
            stored = self.store.sessions()
        resident = [s.resident for s in self.slots if s.resident is not None]
        return list(dict.fromkeys([*resident, *stored]))

    def take_evicted(self) -> list[SessionId]:
        """Sessions no longer warm here since the last call (for the router's affinity)."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
        resident = {s.resident for s in self.slots}
        return [s for s in evicted if s not in resident]

    # --- slot thread side -------------------------------------------------------------

    def run(self, slot: Slot, request: Request, out: TextStream,
            cancelled: threading.Event) -> Generation:
        """Generate `request` in `slot` (call from the slot's thread only)."""
        started = time.perf_counter()
        if request.prompt is not None:
            prompt = self.model.text_tokens(request.prompt)
        else:
            prompt = self.model.chat_tokens(request.messages)
        outside = next((t for t in request.continuation if t >= self.model.n_vocab), None)
        if outside is not None:
            raise BadRequest(f"continuation token {outside} is outside the model's vocabulary "
                             f"({self.model.n_vocab} tokens)")
        prompt = [*prompt, *request.continuation]
        if not prompt:
            raise BadRequest("the prompt is empty")
        if len(prompt) >= self.model.n_ctx:
            raise ContextTooLong(
                f"the prompt is {len(prompt)} tokens but the model's context holds "
                f"{self.model.n_ctx} (prompt and answer together); shorten the conversation"
            )
        self._bring_in(slot, request.session, prompt)
        try:
            result = slot.context.generate(prompt, request.sampling, out, cancelled,
                                           resume=len(request.continuation))
            out.close()
        except Exception:
            slot.context.clear()
            slot.resident = None
            raise
        # Session switch (save/restore) counts as prompt time: it is part of the wait.
        switch_ms = (time.perf_counter() - started) * 1000 - result.prompt_ms - result.generate_ms
        if switch_ms > 0:
            result = Generation(result.finish, result.prompt_tokens, result.cached_tokens,
                                result.completion_tokens, result.prompt_ms + switch_ms,
                                result.generate_ms)
        return result

    def _bring_in(self, slot: Slot, session: SessionId | None, prompt: Sequence[int]) -> None:
        """Make `slot`'s context hold the best state available for `session`'s prompt."""
        if session is not None and slot.resident == session:
            return
        ctx = slot.context
        if slot.resident is not None:
            saved = ctx.save()
            with self._lock:
                self._evicted += self.store.put(slot.resident, saved)
            log.debug("session=%s saved (%d tokens, %.1f MB)", slot.resident,
                      len(saved.tokens), saved.nbytes / 1e6)
        slot.resident = session
        if session is None:
            return
        with self._lock:
            state = self.store.peek(session)
            # Restore only if it beats what the context already shares with the prompt
            # (e.g. a common system prompt).
            if state is not None and common_prefix(state.tokens, prompt) > common_prefix(
                ctx.tokens(), prompt
            ):
                self.store.take(session)
            else:
                state = None
        if state is not None and not ctx.restore(state):
            log.warning("session=%s: the backend refused its saved state; starting cold", session)
