"""Conversations' KV states moved between workers, through the router.

When the scheduler places a request of a session on another worker than the one holding it
warm (a spill while that one is busy, a draining worker, a new placement) and the warm one
is alive, the state can move instead of being recomputed. Whether it should is a cost
model, per token, since both costs grow with the history alike (pichat/router/policy/costs.py):

    moving:     the source's KV bytes per token / the link's measured bytes per second
    recomputing: 1 / the target's measured prompt tokens per second

(states move only between workers of one `state_format`: the same model file and KV
type). The scheduler counts the same cost when it weighs a spill.

The router sends MIGRATE to the source and holds the REQUEST back; the source's STATE
pieces are relayed to the target and the target's STATE_ACKs back (at most `WINDOW` pieces
in flight, pichat/worker/daemon/migration.py); when the target is done or refuses, or the source
aborts, or the transfer stalls for `STALL_S`, the REQUEST goes out. Nothing waits
on a transfer longer than that, and a failed one only costs the recompute it tried to
avoid.

What a worker can make the router do here is bounded: only the transfer's source may send
its pieces and only its target acknowledge them; piece 0 must name the transfer's session
and the request's owner; the bytes relayed may not exceed what piece 0 announced; there
are at most `MAX_TRANSFERS` at once and `PER_WORKER` into or out of each worker.

Failed transfers are counted by reason (`states_refused_format`, `_size`, `_corrupt`,
`_busy`, `_not_warm`, `_stalled`, `_lost`, `_other`) in status and /metrics.
"""

from __future__ import annotations

import logging
import secrets
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pichat.logs import Throttle, clip
from pichat.protocol import Migrate, RequestId, SessionId, State, StateAck, encode
from pichat.router.observe.stats import Stats
from pichat.router.policy.costs import move_beats_read
from pichat.router.policy.identity import session_owner
from pichat.router.policy.records import WorkerId
from pichat.router.policy.scheduler import Scheduler

__all__ = ["Migrations", "STALL_S", "MAX_TRANSFERS", "refusal_reason"]

log = logging.getLogger(__name__)

STALL_S = 10.0
MAX_TRANSFERS = 8
PER_WORKER = 2
"""Transfers into one worker at once, and out of one (what a worker takes on:
pichat/worker/daemon/migration.py), so a turn's move is not held up by a draining worker's
handover between the same workers."""
ENDED_KEPT = 64
MAX_HANDOVER = 256
"""A draining worker's conversations handed over at most (the most recently used)."""


@dataclass(slots=True)
class Transfer:
    id: str
    job: RequestId | None
    """The request waiting for it (None: a draining worker's handover)."""
    session: SessionId
    owner: str | None
    source: WorkerId
    target: WorkerId
    started: float
    heard: float
    announced: int = -1
    relayed: int = 0
    tokens: int = 0


class Names(Protocol):
    def name(self, worker: WorkerId) -> str: ...


class MigrationHub(Protocol):
    """What the transfers need of the router, and all they may touch."""

    scheduler: Scheduler
    stats: Stats
    throttle: Throttle

    @property
    def workerside(self) -> Names: ...

    def now(self) -> float: ...

    def send_worker(self, worker: WorkerId, frames: list[bytes]) -> bool: ...


class Migrations:
    def __init__(self, router: MigrationHub,
                 release: Callable[[RequestId, WorkerId], None]) -> None:
        self.router = router
        self._release = release
        """Send the held-back request to its worker (or free its slot if it is gone)."""
        self.transfers: dict[str, Transfer] = {}
        self._ended: OrderedDict[str, tuple[WorkerId, WorkerId]] = OrderedDict()
        """Transfers that ended lately, and their workers: pieces and acks still on the
        way from those workers are dropped quietly (an abort crosses them on the wire)."""
        self._handover: dict[WorkerId, deque[SessionId]] = {}
        """Sessions of draining workers still to hand over, one transfer at a time each."""

    # --- deciding ---------------------------------------------------------------------

    def worth_it(self, source: WorkerId, target: WorkerId) -> bool:
        """Would moving a state from `source` to `target` beat `target` reading it?"""
        sched = self.router.scheduler
        src, dst = sched.workers.get(source), sched.workers.get(target)
        if src is None or dst is None or source == target:
            return False
        running = self.transfers.values()
        if (len(self.transfers) >= MAX_TRANSFERS
                or sum(t.target == target for t in running) >= PER_WORKER
                or sum(t.source == source for t in running) >= PER_WORKER):
            return False
        return move_beats_read(src.speed, dst.speed, sched.estimates.link_bps)

    def hand_over(self, worker: WorkerId) -> None:
        """`worker` is draining: move its warm conversations (the most recent
        `MAX_HANDOVER`) to the workers that will serve them, one at a time."""
        sessions = self.router.scheduler.sessions_on(worker, MAX_HANDOVER)
        if sessions:
            log.info("worker %s is draining: handing over %d warm conversations",
                     self.router.workerside.name(worker), len(sessions))
            self._handover[worker] = deque(sessions)
            self._next_handover(worker)

    def _next_handover(self, source: WorkerId) -> None:
        queue = self._handover.get(source)
        sched = self.router.scheduler
        while queue:
            if any(t.source == source for t in self.transfers.values()):
                return  # one at a time: the next when this one ends
            session = queue.popleft()
            if sched.affinity.get(session) != source:
                continue  # a turn took it elsewhere meanwhile
            targets = [w for w, v in sched.workers.items()
                       if not v.draining and w != source and self.worth_it(source, w)]
            if not targets:  # none free to take one now: again when a transfer ends
                queue.appendleft(session)
                return
            target = min(targets, key=lambda w: (sched.workers[w].warm, sched.workers[w].busy))
            self.start(None, session, session_owner(session), source, target,
                       self.router.now())
            return
        self._handover.pop(source, None)

    def start(self, job: RequestId | None, session: SessionId, owner: str | None,
              source: WorkerId, target: WorkerId, now: float) -> None:
        tid = secrets.token_hex(8)
        self.transfers[tid] = Transfer(tid, job, session, owner, source, target, now, now)
        self.router.stats.events["state_transfers_started"] += 1
        ws = self.router.workerside
        log.info("req=%s session=%s: moving its KV state from %s to %s", job, session,
                 ws.name(source), ws.name(target))
        if not self.router.send_worker(source, encode(Migrate(tid, session, ws.name(target)))):
            self._end(tid, "the source is unreachable")

    # --- relaying ---------------------------------------------------------------------

    def on_state(self, worker: WorkerId, piece: State, now: float) -> None:
        t = self.transfers.get(piece.transfer)
        if t is None or worker != t.source:
            if self._ended.get(piece.transfer, (None,))[0] != worker:
                self._stray(worker, "STATE")
            return
        t.heard = now
        if piece.abort:
            self.router.send_worker(t.target, encode(piece))
            self._end(t.id, f"the source gave up: {clip(piece.abort, 80)}")
            return
        if piece.seq == 0:
            if piece.session != t.session or piece.owner != t.owner:
                self._abort(t, "its first piece names another session or owner")
                return
            t.announced, t.tokens = piece.data_bytes, len(piece.tokens)
        elif t.announced < 0:
            self._abort(t, "pieces before the first")
            return
        t.relayed += len(piece.data)
        if t.relayed > t.announced:
            self._abort(t, "more bytes than announced")
            return
        if not self.router.send_worker(t.target, encode(piece)):
            self._end(t.id, "the target is unreachable")

    def on_ack(self, worker: WorkerId, ack: StateAck, now: float) -> None:
        t = self.transfers.get(ack.transfer)
        if t is None or worker != t.target:
            if self._ended.get(ack.transfer, (None, None))[1] != worker:
                self._stray(worker, "STATE_ACK")
            return
        t.heard = now
        self.router.send_worker(t.source, encode(ack))
        if ack.refused:
            self._end(t.id, f"the target refused it: {clip(ack.refused, 80)}")
        elif ack.done:
            seconds = max(now - t.started, 1e-3)
            if t.relayed >= 1 << 20:  # long enough to say something about the link
                self.router.scheduler.estimates.learn_link(t.relayed, seconds)
            events = self.router.stats.events
            events["states_moved"] += 1
            events["state_bytes_moved"] += t.relayed
            events["state_tokens_moved"] += t.tokens
            events["state_move_ms"] += round(seconds * 1000)
            log.info("req=%s session=%s: KV state moved (%d tokens, %.1f MB, %.0f ms)",
                     t.job, t.session, t.tokens, t.relayed / 1e6, seconds * 1000)
            if t.job is None:  # a handover: the conversation lives on the target now
                self.router.scheduler.move_session(t.session, t.target)
                events["states_handed_over"] += 1
            self._end(t.id, None)

    # --- ending -----------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for t in [t for t in self.transfers.values() if now - t.heard > STALL_S]:
            self._abort(t, f"stalled for {now - t.heard:.0f}s")

    def next_wakeup(self) -> float | None:
        return min((t.heard + STALL_S for t in self.transfers.values()), default=None)

    def worker_lost(self, worker: WorkerId) -> None:
        """A worker of a transfer is gone: the request goes on (the scheduler requeues it
        if it was the target's)."""
        self._handover.pop(worker, None)
        for t in [t for t in self.transfers.values() if worker in (t.source, t.target)]:
            self._abort(t, "a worker of the transfer was lost")

    def _abort(self, t: Transfer, reason: str) -> None:
        self.router.send_worker(t.source, encode(StateAck(t.id, refused=reason)))
        self.router.send_worker(t.target, encode(State(t.id, 0, abort=reason)))
        self._end(t.id, reason)

    def _end(self, tid: str, failure: str | None) -> None:
        t = self.transfers.pop(tid, None)
        if t is None:
            return
        self._ended[tid] = (t.source, t.target)
        if len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        if failure is not None:
            events = self.router.stats.events
            events["state_transfers_failed"] += 1
            events[f"states_refused_{refusal_reason(failure)}"] += 1
            if t.job is None:  # a handover (the whole cluster may be stopping)
                log.info("session=%s: not handed over (%s)", t.session, failure)
            else:
                log.warning("req=%s session=%s: KV state not moved (%s); the worker reads "
                            "the conversation again", t.job, t.session, failure)
        if t.job is not None:
            self._release(t.job, t.target)
        for source in list(self._handover):
            self._next_handover(source)

    def _stray(self, worker: WorkerId, what: str) -> None:
        r = self.router
        r.stats.events["state_messages_refused"] += 1
        name = r.workerside.name(worker)
        r.throttle.log(r.now(), logging.WARNING, "stray state message",
                       "worker %s sent a %s for no transfer of its own; dropped", name, what,
                       detail=name)


REFUSAL_REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("format", ("made for",)),
    ("size", ("more than the session store", "do not fit the context")),
    ("corrupt", ("digest", "bytes than announced", "out of order", "names another",
                 "before the first")),
    ("busy", ("too many transfers", "busy sending")),
    ("not_warm", ("not warm",)),
    ("stalled", ("stalled",)),
    ("lost", ("lost", "unreachable")),
)


def refusal_reason(failure: str) -> str:
    """Why a transfer failed, as one of a few fixed words (what status counts by): the
    text may come from a worker, so it only picks a word, never becomes a key itself."""
    for reason, signs in REFUSAL_REASONS:
        if any(sign in failure for sign in signs):
            return reason
    return "other"
