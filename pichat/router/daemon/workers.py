"""The router's side facing workers: what each message from a worker means.

A worker registers (READY: its name must be its key's, its warm sessions must carry the
router's leases), heartbeats (load, evicted sessions, draining), streams the answers of
the requests it was given (CHUNK, DONE, ERROR: counted only from the worker the request is
assigned to now), and leaves (DISCONNECT). The facts kept about a worker live on its
scheduler record (`WorkerView.meta`, a `WorkerMeta`): the scheduler's registry is the only
one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Protocol

from pichat.config import RouterConfig
from pichat.errors import ErrorCode, ProtocolError
from pichat.logs import Throttle, clip
from pichat.protocol import (
    Chunk,
    Disconnect,
    Done,
    Error,
    Heartbeat,
    Ready,
    RequestId,
    SessionId,
    State,
    StateAck,
    decode,
    encode,
)
from pichat.router.daemon.migration import Migrations
from pichat.router.observe.metrics import RouterMetrics
from pichat.router.observe.stats import Stats
from pichat.router.policy.costs import Speed
from pichat.router.policy.identity import Leases, NameBook
from pichat.router.policy.jobs import ClientJob
from pichat.router.policy.prefix import STATE_BYTES, PrefixIndex
from pichat.router.policy.scheduler import Action, Scheduler, WorkerDead, WorkerId
from pichat.security import Gatekeeper

__all__ = ["WorkerMeta", "WorkerSide", "HEARTBEAT", "UNKNOWN_WORKER"]

log = logging.getLogger(__name__)

HEARTBEAT = encode(Heartbeat())
UNKNOWN_WORKER = encode(Disconnect("unknown worker: send READY"))
_LEFT = "worker left"


@dataclass(slots=True)
class WorkerMeta:
    """What the router knows of a registered worker beyond what the scheduler uses."""

    ready: Ready
    joined: float
    """Wall-clock time of the registration."""
    heartbeat: Heartbeat
    """The latest (load, warm sessions, speed, draining)."""
    identity: str
    """Its key's name, or (without keys) its name."""
    served: int = 0

    @property
    def lease_holder(self) -> str:
        """What its leases are bound to: its key and its name, so that no other worker
        attracts its sessions, not even one that holds the same key (a key copied to
        every Pi) under another name."""
        return f"{self.identity}/{self.ready.worker}"


class WorkerHub(Protocol):
    """What the worker side needs of the router, and all it may touch: the scheduler and
    the router's books, and the few things the router does (apply the scheduler's actions,
    send to a worker, deliver to a client)."""

    config: RouterConfig
    scheduler: Scheduler
    stats: Stats
    metrics: RouterMetrics
    throttle: Throttle
    leases: Leases
    names: NameBook
    prefixes: PrefixIndex
    registrations: Counter[str]
    migrations: Migrations
    gatekeeper: Gatekeeper | None

    def now(self) -> float: ...

    def changed(self) -> None: ...

    def apply(self, actions: list[Action]) -> None: ...

    def send_worker(self, worker: WorkerId, frames: list[bytes]) -> bool: ...

    def client(self, job_id: RequestId) -> ClientJob | None: ...

    def detach(self, job_id: RequestId) -> ClientJob | None: ...

    def deliver(self, job_id: RequestId, message: Chunk | Done | Error,
                frames: list[bytes] | None) -> None: ...


class WorkerSide:
    def __init__(self, router: WorkerHub) -> None:
        self.router = router
        self._told_to_register: dict[WorkerId, float] = {}

    def meta(self, worker: WorkerId) -> WorkerMeta | None:
        view = self.router.scheduler.workers.get(worker)
        return view.meta if view is not None else None

    def name(self, worker: WorkerId) -> str:
        meta = self.meta(worker)
        return meta.ready.worker if meta else worker.hex()

    # --- messages ---------------------------------------------------------------------

    def on_message(self, frames: list[bytes], sender: str) -> None:
        r = self.router
        if r.gatekeeper is not None and not r.gatekeeper.admits("workers", sender):
            return  # its key was revoked: its session lingers, its messages do not count
        worker, body = WorkerId(frames[0]), frames[1:]
        now = r.now()
        r.changed()
        try:
            message = decode(body)
        except ProtocolError as exc:
            r.stats.events["worker_bad_messages"] += 1
            r.throttle.log(now, logging.WARNING, "bad worker message",
                           "worker %s: bad message: %s", self.name(worker), exc,
                           detail=self.name(worker))
            if exc.code is ErrorCode.VERSION:
                r.send_worker(worker, encode(Error("", exc.code, str(exc))))
            return
        if isinstance(message, Ready):
            self._on_ready(worker, message, now,
                           sender[len("key:"):] if sender.startswith("key:") else None)
            return
        if not r.scheduler.heard_from(worker, now):
            if not isinstance(message, Disconnect):
                self.tell_to_register(worker, now)
            return
        match message:
            case Heartbeat():
                meta = self.meta(worker)
                assert meta is not None
                if message.draining and not meta.heartbeat.draining:
                    log.info("worker %s is draining: no new requests for it", self.name(worker))
                    r.scheduler.set_draining(worker)
                    if r.config.migration == "auto":
                        r.migrations.hand_over(worker)
                meta.heartbeat = message
                r.scheduler.measured(worker, message.prompt_tps, message.tps)
                r.apply(r.scheduler.occupied(worker, message.busy, now))
                for session in self._leased(meta, message.warmed, now):
                    r.scheduler.move_session(SessionId(session), worker)  # begun elsewhere
                for session, reached in message.answered:  # ... and answered there
                    if r.scheduler.warm_worker(SessionId(session)) == worker:
                        with contextlib.suppress(ValueError):
                            if len(state := bytes.fromhex(reached)) == STATE_BYTES:
                                r.prefixes.remember(state, SessionId(session))
                if message.evicted:
                    r.scheduler.forget_sessions(worker, message.evicted)
            case Chunk():
                self._on_chunk(worker, message, body, now)
            case Done():
                self._on_done(worker, message, body, now)
            case Error():
                self._on_error(worker, message, body, now)
            case State():
                r.migrations.on_state(worker, message, now)
            case StateAck():
                r.migrations.on_ack(worker, message, now)
            case Disconnect():
                log.info("worker %s leaving: %s; %d warm sessions handed back",
                         self.name(worker), clip(message.reason, 80), len(message.sessions))
                r.scheduler.forget_sessions(worker, message.sessions)
                r.apply(r.scheduler.remove_worker(worker, now, _LEFT))
            case _:
                r.throttle.log(now, logging.WARNING, "odd worker command",
                               "worker %s sent %s; ignored", self.name(worker),
                               message.COMMAND.name)

    def on_dropped(self, frames: list[bytes], n_frames: int) -> None:
        r = self.router
        r.changed()
        r.stats.events["worker_bad_messages"] += 1
        name = self.name(WorkerId(frames[0]))
        r.throttle.log(r.now(), logging.WARNING, "too many frames",
                       "worker %s: a message of %d frames was dropped unread", name,
                       n_frames - 1, detail=name)

    def tell_to_register(self, worker: WorkerId, now: float) -> None:
        """DISCONNECT an unknown worker, once per heartbeat interval: the messages it sent
        before it heard us must not each trigger another re-registration."""
        told = self._told_to_register.get(worker)
        if told is not None and now - told < self.router.config.heartbeat_interval:
            return
        if len(self._told_to_register) > 10_000:
            self._told_to_register.clear()
        self._told_to_register[worker] = now
        self.router.send_worker(worker, UNKNOWN_WORKER)

    def lost(self, dead: WorkerDead) -> None:
        """The scheduler dropped the worker: release its name; make it register again if
        it was only slow (stopped, partitioned)."""
        meta: WorkerMeta | None = dead.meta
        if meta is None:
            return
        r = self.router
        r.migrations.worker_lost(dead.worker)
        r.names.release(meta.ready.worker, dead.worker)
        if dead.reason != _LEFT:
            r.stats.events["workers_lost"] += 1
            log.warning("worker %s lost: %s", meta.ready.worker, dead.reason)
            self.tell_to_register(dead.worker, r.now())

    def _on_ready(self, worker: WorkerId, ready: Ready, now: float, user: str | None) -> None:
        r = self.router
        self._told_to_register.pop(worker, None)
        old = self.meta(worker)
        if old is not None and old.ready.worker != ready.worker:
            r.names.release(old.ready.worker, worker)
        if user is not None and (holder := r.names.claim(ready.worker, user, worker)):
            r.stats.events["workers_refused_name"] += 1
            r.throttle.log(now, logging.WARNING, "name taken",
                           "refused worker %s (key %s): the name is held by key %s",
                           clip(ready.worker, 60), user, holder, detail=user)
            r.send_worker(worker, encode(Error(
                "", ErrorCode.BAD_REQUEST,
                f"the worker name {clip(ready.worker, 60)!r} is in use by another key; "
                "choose another --name")))
            return
        identity = user or ready.worker
        meta = WorkerMeta(ready, time.time(), Heartbeat(), identity)
        warm = self._leased(meta, ready.warm, now)
        r.registrations[ready.worker] += 1
        if len(r.registrations) > 4 * r.config.scheduler.max_sessions:
            r.registrations.clear()  # bounded: names are free text
        log.info("worker %s ready: model %s (%s), %d slots, ctx %d, %d warm sessions",
                 clip(ready.worker, 60), clip(ready.model, 60), ready.backend, ready.slots,
                 ready.ctx, len(warm))
        meta.heartbeat = Heartbeat(warm=len(warm))
        speed = Speed(kv_token_bytes=ready.kv_token_bytes, state_format=ready.state_format)
        actions = r.scheduler.add_worker(worker, ready.model, ready.slots, now, warm, meta,
                                         speed, embedding_only=ready.embedding_only)
        if old is not None:
            # It registers afresh (it reset itself): what it ran is requeued; no DISCONNECT.
            log.info("worker %s registered again; its running requests are placed again",
                     clip(ready.worker, 60))
            actions = [a for a in actions if not isinstance(a, WorkerDead)]
        r.send_worker(worker, HEARTBEAT)  # an acknowledgement: "I know you now"
        r.apply(actions)

    def _leased(self, meta: WorkerMeta, claims: tuple[tuple[str, str], ...],
                now: float) -> tuple[str, ...]:
        """The sessions of `claims` (session, lease) this router leased to the worker of
        `meta`; the others are counted and logged, then ignored."""
        r = self.router
        warm = tuple(s for s, lease in claims if r.leases.valid(meta.lease_holder, s, lease))
        if len(warm) < len(claims):
            name = clip(meta.ready.worker, 60)
            r.stats.events["warm_claims_refused"] += len(claims) - len(warm)
            r.throttle.log(now, logging.WARNING, "unleased claims",
                           "worker %s claimed %d warm sessions without a valid lease; "
                           "ignored", name, len(claims) - len(warm), detail=name)
        return warm

    def _owned(self, worker: WorkerId, job_id: RequestId) -> bool:
        """Results count only from the worker the request is assigned to now: anything
        else is stale (a worker we gave up on, a request already re-dispatched)."""
        if self.router.scheduler.owner(job_id) == worker:
            return True
        self.router.stats.events["stale_results"] += 1
        return False

    def _on_chunk(self, worker: WorkerId, chunk: Chunk, frames: list[bytes], now: float) -> None:
        r = self.router
        if not self._owned(worker, chunk.id):
            return
        client = r.client(chunk.id)
        if client is None:
            r.scheduler.chunk_seen(chunk.id)
            return  # the client is gone or was answered; the worker is being cancelled
        if client.first_chunk is None:
            client.first_chunk = now
            r.metrics.ttft.observe(now - client.arrived)
        numbered = client.cursor.accept(chunk)
        r.scheduler.chunk_seen(chunk.id, resumable=client.cursor.resumable,
                               tokens=len(chunk.tokens) or 1)
        if numbered is not chunk:  # renumbered after a failover
            chunk, frames = numbered, encode(numbered)
        r.deliver(chunk.id, chunk, frames)

    def _on_done(self, worker: WorkerId, done: Done, frames: list[bytes], now: float) -> None:
        r = self.router
        if not self._owned(worker, done.id):
            return
        client = r.client(done.id)
        if client is not None:
            if (final := client.cursor.final(done)) is not done:
                done, frames = final, None
            r.stats.completed(done.usage)
            r.metrics.completed(done.usage)
            request = client.request
            if request.messages and request.session and done.finish != "cancelled":
                r.prefixes.record(request.messages, "".join(client.cursor.text),
                                  request.session, request.tools)
            meta = self.meta(worker)
            if meta is not None:
                meta.served += 1
            log.info("req=%s session=%s worker=%s done: %s, prompt %d (cached %d), "
                     "%d tokens, %.0f ms",
                     done.id, request.session, clip(done.worker, 60), done.finish,
                     done.usage.prompt_tokens, done.usage.cached_tokens,
                     done.usage.completion_tokens, (now - client.arrived) * 1000)
            r.deliver(done.id, done, frames)
        r.apply(r.scheduler.finished(done.id, now, done.usage))

    def _on_error(self, worker: WorkerId, error: Error, frames: list[bytes], now: float) -> None:
        r = self.router
        if not error.id:
            r.throttle.log(now, logging.WARNING, "worker error",
                           "worker %s reports: %s: %s", self.name(worker), error.code,
                           clip(error.message, 200), detail=self.name(worker))
            return
        job_id = RequestId(error.id)
        if not self._owned(worker, job_id):
            return
        if error.code is ErrorCode.BUSY and r.client(job_id) is not None:
            # Refused before it started (draining, or full): place it again.
            log.info("req=%s refused by worker %s (%s); placing it again", error.id,
                     self.name(worker), clip(error.message, 80))
            r.apply(r.scheduler.bounce(job_id, now, full="slots are busy" in error.message))
            return
        client = r.detach(job_id)
        if client is not None:
            r.stats.outcomes[error.code.value] += 1
            log.info("req=%s worker=%s error %s: %s", error.id, self.name(worker),
                     error.code, clip(error.message, 200))
            client.sink.deliver(error, frames)
        r.apply(r.scheduler.finished(job_id, now))
