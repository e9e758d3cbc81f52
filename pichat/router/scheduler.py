"""Where each request runs: the router's routing policy, as a pure state machine.

The scheduler does no I/O and reads no clock: every method takes `now` (seconds, any
monotonic origin) and returns the `Action`s the router must carry out, in order. That
keeps the policy testable as a table of cases (tests/test_scheduler.py).

Policy `affinity` (the default):
- A request whose session is warm on a worker (the worker served it last) goes there when
  it has a free slot.
- If that worker is busy, the request waits for it up to `affinity_wait` seconds after
  arriving; after that it spills to the least-loaded worker, and the session's affinity
  moves with it. (Re-reading a long history on a cold worker can cost minutes on a Pi, so
  a short wait for the warm one usually wins.)
- A new session goes to the worker with the most free slots (ties: fewer warm sessions),
  unless the request names a preferred worker (one that holds a prefix it shares, such as
  a common system prompt): that one gets it while its load, in running requests and in
  conversations held, stays within `prefix_load_factor` times its share ("bounded
  loads"), so a popular prefix cannot pile every conversation onto one worker.

Policy `round-robin` ignores sessions: the next worker in turn with a free slot. It is the
baseline for benchmarks.

Both policies queue requests when no suitable slot is free, up to `queue_limit`; past it a
request fails at once with `busy`. Every request has a deadline in the queue and one in
all.

Fairness between owners (a client key, an API key: whoever a request belongs to): when a
slot frees, the owner served least recently goes first (round-robin between owners, FIFO
within one), so one client keeping every slot busy delays another by one answer at most.
A full queue takes a request from an owner with fewer queued requests than the owner with
the most by failing the latter's newest one (`busy`): alone, an owner may use the whole
queue; under contention, owners get equal shares. `owner_max_running` and
`owner_max_queued` cap an owner outright (0: no cap). A worker that does not confirm a
cancel within `cancel_grace` seconds loses the request anyway: its slot is written off
so that a worker ignoring CANCEL cannot hold router state forever.

A worker not heard from for `worker_expiry` seconds is dead: its requests go back to
the head of the queue, those that had streamed part of an answer as continuations
(failover: the router has the delivered tokens; at most `max_failovers` times), the
rest fail with `worker_lost`. A draining worker gets no new requests.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Literal, NewType, TypeAlias

from pichat.errors import ErrorCode
from pichat.protocol import RequestId, SessionId

__all__ = [
    "Policy",
    "WorkerId",
    "SchedulerConfig",
    "Dispatch",
    "Fail",
    "CancelOnWorker",
    "WorkerDead",
    "Action",
    "Job",
    "WorkerView",
    "Scheduler",
]

Policy: TypeAlias = Literal["affinity", "round-robin"]
POLICIES: tuple[Policy, ...] = ("affinity", "round-robin")

WorkerId = NewType("WorkerId", bytes)
"""The worker's ZeroMQ routing id on the router's worker socket."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy = "affinity"
    affinity_wait: float = 5.0
    """Seconds a request waits for its busy warm worker before spilling elsewhere."""
    queue_limit: int = 256
    """Requests that may wait for a slot; more are refused with `busy`."""
    queue_timeout: float = 120.0
    """Seconds a request may wait for a slot before failing with `timeout`."""
    request_timeout: float = 600.0
    """Seconds a request may take in all (queue + generation) unless the client asks less."""
    worker_expiry: float = 3.0
    """A worker silent this long is dead (heartbeat interval x liveness)."""
    max_sessions: int = 20_000
    """Affinity entries remembered (least recently used forgotten first): ~170 bytes each."""
    max_failovers: int = 2
    """Times one answer may move to another worker mid-stream."""
    prefix_load_factor: float = 1.25
    """A preferred worker (shared prefix) is used while its load, counting the new request,
    is at most this times the average load of the workers that could serve it."""
    startup_grace: float = 0.0
    """Seconds after the router starts (`Scheduler.started`) in which a request finding no
    worker waits for one instead of failing with `no_workers` at once: after a router
    restart, the workers register again within a few heartbeats."""
    owner_max_running: int = 0
    """Requests one owner may have running at once (0: as many as there are slots)."""
    owner_max_queued: int = 0
    """Requests one owner may have waiting (0: any share of the queue others leave)."""
    cancel_grace: float = 10.0
    """Seconds a worker has to confirm a cancel before the router frees the slot itself."""


# --- actions: what the router must do -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the request to the worker."""

    job: RequestId
    worker: WorkerId
    affinity_hit: bool = False
    prefix_hit: bool = False
    """Placed on the preferred worker (a shared prefix), within the load bound."""
    spilled: bool = False
    retry: bool = False
    """The request is being re-sent after its first worker died."""
    failover: bool = False
    """... and it had streamed part of its answer: send it as a continuation."""


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the client with an ERROR and forget the request."""

    job: RequestId
    code: ErrorCode
    message: str


@dataclass(frozen=True, slots=True)
class CancelOnWorker:
    """Tell the worker to stop generating the request (its slot frees when it confirms)."""

    job: RequestId
    worker: WorkerId


@dataclass(frozen=True, slots=True)
class WorkerDead:
    worker: WorkerId
    reason: str


Action: TypeAlias = Dispatch | Fail | CancelOnWorker | WorkerDead


# --- state ----------------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    id: RequestId
    session: SessionId | None
    model: str | None
    arrived: float
    queue_deadline: float
    deadline: float
    spill_at: float
    prefer: WorkerId | None = None
    worker: WorkerId | None = None
    streamed: bool = False
    """The worker has sent at least one chunk: the request can only be continued."""
    resumable: bool = True
    """Every chunk so far carried its token ids, so another worker can continue it."""
    failovers: int = 0
    bounces: int = 0
    avoid: set[WorkerId] = field(default_factory=set)
    """Workers that refused this request (until they register again)."""
    abandoned: bool = False
    """The client was answered (cancel, timeout); only the worker's slot is still held."""
    attempts: int = 0
    owner: str = ""
    cancel_deadline: float = math.inf
    """When an abandoned request's slot is written off if the worker has not confirmed."""


@dataclass(slots=True)
class WorkerView:
    id: WorkerId
    model: str
    slots: int
    last_seen: float
    busy: int = 0
    warm: int = 0
    """Sessions whose affinity points here."""
    draining: bool = False
    order: int = 0
    jobs: set[RequestId] = field(default_factory=set)

    @property
    def free(self) -> int:
        return self.slots - self.busy


class Scheduler:
    """The routing policy's state: workers, jobs, the queue and session affinity."""

    def __init__(self, config: SchedulerConfig, started: float = 0.0) -> None:
        if config.policy not in POLICIES:
            raise ValueError(f"unknown policy {config.policy!r}; choose one of {POLICIES}")
        self.config = config
        self.started = started
        self.workers: dict[WorkerId, WorkerView] = {}
        self.jobs: dict[RequestId, Job] = {}
        self.queue: deque[RequestId] = deque()
        self.affinity: OrderedDict[SessionId, WorkerId] = OrderedDict()
        self._registrations = 0
        self._rr_next = 0
        self._served = 0
        self._last_served: dict[str, int] = {}
        """Per owner with jobs: when it was last given a slot (round-robin between owners)."""
        self.sessions_forgotten = 0
        """Sessions dropped from the affinity map to keep it within `max_sessions`."""
        self.pushed_out = 0
        """Queued requests failed to make room for another owner's."""
        self.cancels_ignored = 0
        """Cancelled requests whose worker never confirmed within `cancel_grace`."""

    # --- workers ----------------------------------------------------------------------

    def add_worker(self, worker: WorkerId, model: str, slots: int, now: float,
                   sessions: tuple[str, ...] = ()) -> list[Action]:
        """A worker announced itself (READY). A known worker re-announcing has restarted:
        whatever it was running is lost."""
        actions: list[Action] = []
        if worker in self.workers:
            actions += self._drop_worker(worker, now, "worker re-registered")
        self._registrations += 1
        self.workers[worker] = WorkerView(worker, model, slots, now, order=self._registrations)
        for job in self.jobs.values():  # a fresh registration: it may take them now
            job.avoid.discard(worker)
        for session in sessions:
            self._set_affinity(SessionId(session), worker)
        actions += self._pump(now)
        return actions

    def heard_from(self, worker: WorkerId, now: float) -> bool:
        """Any message from a worker proves it alive. False if the worker is unknown."""
        view = self.workers.get(worker)
        if view is None:
            return False
        view.last_seen = now
        return True

    def forget_sessions(self, worker: WorkerId, sessions: tuple[str, ...]) -> None:
        """The worker evicted these sessions' KV state: they are no longer warm there."""
        for session in sessions:
            if self.affinity.get(SessionId(session)) == worker:
                self._drop_affinity(SessionId(session))

    def set_draining(self, worker: WorkerId) -> None:
        """The worker finishes what it has and takes nothing new."""
        view = self.workers.get(worker)
        if view is not None:
            view.draining = True

    def remove_worker(self, worker: WorkerId, now: float, reason: str) -> list[Action]:
        """The worker left (DISCONNECT) or was found dead."""
        if worker not in self.workers:
            return []
        return self._drop_worker(worker, now, reason) + self._pump(now)

    # --- requests ---------------------------------------------------------------------

    def submit(self, job_id: RequestId, session: SessionId | None, now: float, *,
               model: str | None = None, timeout: float | None = None,
               prefer: WorkerId | None = None, owner: str = "") -> list[Action]:
        """A new request. The caller guarantees `job_id` is not in use."""
        cfg = self.config
        deadline = now + min(timeout, cfg.request_timeout) if timeout else now + cfg.request_timeout
        job = Job(
            id=job_id,
            session=session,
            model=model,
            arrived=now,
            queue_deadline=min(now + cfg.queue_timeout, deadline),
            deadline=deadline,
            spill_at=now + cfg.affinity_wait,
            prefer=prefer,
            owner=owner,
        )
        if not self._serving(model):
            grace_end = self.started + cfg.startup_grace
            if now >= grace_end or (model and self.workers):
                return [self._no_workers(job_id, model)]
            job.queue_deadline = min(job.queue_deadline, grace_end)  # wait for them
        actions: list[Action] = []
        waiting = self._queued_by_owner()
        mine = len(waiting.get(owner, ()))
        if cfg.owner_max_queued and mine >= cfg.owner_max_queued:
            return [Fail(job_id, ErrorCode.BUSY,
                         f"you have {mine} requests waiting already (at most "
                         f"{cfg.owner_max_queued}); retry later")]
        if len(self.queue) >= cfg.queue_limit and self._place(job, now) is None:
            hog = max(waiting, key=lambda o: len(waiting[o]), default=None)
            if hog is None or len(waiting[hog]) <= mine + 1:
                return [Fail(job_id, ErrorCode.BUSY,
                             f"all slots busy and {len(self.queue)} requests queued; retry later")]
            victim = waiting[hog][-1]  # its newest: it has waited least
            del self.jobs[victim]
            self._unqueue(victim)
            self.pushed_out += 1
            actions.append(Fail(victim, ErrorCode.BUSY,
                                "the queue is full and other clients are waiting; your share "
                                "of it is used up: retry later"))
        self.jobs[job_id] = job
        self.queue.append(job_id)
        return actions + self._pump(now)

    def chunk_seen(self, job_id: RequestId, resumable: bool = True) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.streamed = True
            job.resumable = job.resumable and resumable

    def bounce(self, job_id: RequestId, now: float) -> list[Action]:
        """The worker refused the request (full, draining, resetting) before starting it:
        queue it again, at the head (a streamed one as a continuation, as before); after
        three refusals it fails with `busy`."""
        job = self.jobs.get(job_id)
        if job is None or job.worker is None:
            return []
        view = self.workers.get(job.worker)
        if view is not None:
            view.busy -= 1
            view.jobs.discard(job_id)
        job.avoid.add(job.worker)
        job.worker = None
        job.bounces += 1
        if job.bounces > 3:
            del self.jobs[job_id]
            return [Fail(job_id, ErrorCode.BUSY, "workers refused the request; retry later")]
        self.queue.appendleft(job_id)
        return self._pump(now)

    def finished(self, job_id: RequestId, now: float) -> list[Action]:
        """The worker ended the request (DONE or ERROR): its slot is free again."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return []
        if job.worker is not None and job.worker in self.workers:
            view = self.workers[job.worker]
            view.busy -= 1
            view.jobs.discard(job_id)
        elif job.worker is None:
            self._unqueue(job_id)
        return self._pump(now)

    def cancel(self, job_id: RequestId, now: float) -> list[Action]:
        """The client gave up. A queued request is dropped; a running one is stopped on its
        worker, whose slot stays counted busy until the worker confirms."""
        job = self.jobs.get(job_id)
        if job is None:
            return []
        if job.worker is None:
            del self.jobs[job_id]
            self._unqueue(job_id)
            return []
        if job.abandoned:
            return []
        self._abandon(job, now)
        return [CancelOnWorker(job_id, job.worker)]

    def owner(self, job_id: RequestId) -> WorkerId | None:
        job = self.jobs.get(job_id)
        return None if job is None else job.worker

    # --- time -------------------------------------------------------------------------

    def tick(self, now: float) -> list[Action]:
        """Expire dead workers and overdue requests, and spill requests that waited long
        enough for their warm worker."""
        actions: list[Action] = []
        expiry = self.config.worker_expiry
        for view in [w for w in self.workers.values() if now - w.last_seen >= expiry]:
            actions += self._drop_worker(
                view.id, now, f"no heartbeat for {now - view.last_seen:.1f}s"
            )
        for job in list(self.jobs.values()):
            if job.worker is None and now >= job.queue_deadline:
                del self.jobs[job.id]
                self._unqueue(job.id)
                waited = now - job.arrived
                actions.append(Fail(job.id, ErrorCode.TIMEOUT,
                                    f"no slot became free within {waited:.0f}s")
                               if self._serving(job.model) else self._no_workers(job.id, job.model))
            elif job.worker is not None and not job.abandoned and now >= job.deadline:
                self._abandon(job, now)
                actions.append(Fail(job.id, ErrorCode.TIMEOUT,
                                    f"not finished within {now - job.arrived:.0f}s"))
                actions.append(CancelOnWorker(job.id, job.worker))
            elif job.abandoned and now >= job.cancel_deadline:
                # The worker ignored the cancel: write its slot off and forget the job (if
                # it answers after all, its results are stale; if it is full, it refuses).
                del self.jobs[job.id]
                view = self.workers.get(job.worker) if job.worker is not None else None
                if view is not None:
                    view.busy -= 1
                    view.jobs.discard(job.id)
                self.cancels_ignored += 1
        return actions + self._pump(now)

    def next_wakeup(self, now: float) -> float | None:
        """The earliest time after `now` at which `tick` may have something to do (None:
        nothing pending)."""
        times = [w.last_seen + self.config.worker_expiry for w in self.workers.values()]
        for job in self.jobs.values():
            if job.worker is None:
                times.append(job.queue_deadline)
                if job.spill_at > now:
                    times.append(job.spill_at)
            elif not job.abandoned:
                times.append(job.deadline)
            else:
                times.append(job.cancel_deadline)
        return min(times, default=None)

    # --- views ------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        return len(self.queue)

    def warm_worker(self, session: SessionId) -> WorkerId | None:
        return self.affinity.get(session)

    # --- internals --------------------------------------------------------------------

    def _serving(self, model: str | None) -> bool:
        """Is a worker that takes new work (of `model`, if named) connected?"""
        return any((model is None or w.model == model) and not w.draining
                   for w in self.workers.values())

    def _no_workers(self, job_id: RequestId, model: str | None) -> Fail:
        what = f"serving model {model!r}" if model and self.workers else "connected"
        return Fail(job_id, ErrorCode.NO_WORKERS, f"no worker {what}")

    def _abandon(self, job: Job, now: float) -> None:
        job.abandoned = True
        job.cancel_deadline = now + self.config.cancel_grace

    def _queued_by_owner(self) -> dict[str, list[RequestId]]:
        """Each owner's queued requests, oldest first."""
        out: dict[str, list[RequestId]] = {}
        for job_id in self.queue:
            out.setdefault(self.jobs[job_id].owner, []).append(job_id)
        return out

    def _next_in_turn(self, now: float) -> tuple[Job, tuple[WorkerId, bool, bool]] | None:
        """The queued request to dispatch next, and where: owners take turns (the one
        served least recently first); within an owner, the oldest request that can be
        placed now."""
        waiting = self._queued_by_owner()
        cap = self.config.owner_max_running
        running: dict[str, int] = {}
        if cap:
            for job in self.jobs.values():
                if job.worker is not None:
                    running[job.owner] = running.get(job.owner, 0) + 1
        for owner in sorted(waiting, key=lambda o: self._last_served.get(o, -1)):
            if cap and running.get(owner, 0) >= cap:
                continue
            for job_id in waiting[owner]:
                job = self.jobs[job_id]
                placed = self._place(job, now)
                if placed is not None:
                    return job, placed
        return None

    def _pump(self, now: float) -> list[Action]:
        """Dispatch queued requests while slots are free, owners taking turns."""
        actions: list[Action] = []
        while self.queue and any(w.free > 0 and not w.draining for w in self.workers.values()):
            found = self._next_in_turn(now)
            if found is None:
                break
            job, (worker, hit, spilled) = found
            job_id = job.id
            self._served += 1
            self._last_served[job.owner] = self._served
            prefix_hit = not hit and worker == job.prefer
            self._unqueue(job_id)
            job.worker = worker
            job.attempts += 1
            view = self.workers[worker]
            self._rr_next = view.order + 1
            view.busy += 1
            view.jobs.add(job_id)
            if job.session is not None:
                self._set_affinity(job.session, worker)
            actions.append(Dispatch(job_id, worker, affinity_hit=hit, prefix_hit=prefix_hit,
                                    spilled=spilled, retry=job.attempts > 1,
                                    failover=job.streamed))
        if len(self._last_served) > 2 * len(self.jobs) + 64:  # forget owners with no jobs
            owners = {job.owner for job in self.jobs.values()}
            self._last_served = {o: t for o, t in self._last_served.items() if o in owners}
        return actions

    def _place(self, job: Job, now: float) -> tuple[WorkerId, bool, bool] | None:
        """(worker, affinity hit, spilled) for `job` now, or None to keep it waiting."""
        eligible = [w for w in self.workers.values()
                    if not w.draining and w.id not in job.avoid
                    and (job.model is None or w.model == job.model)]
        free = [w for w in eligible if w.free > 0]
        if self.config.policy == "round-robin":
            if not free:
                return None
            ordered = sorted(free, key=lambda w: w.order)
            pick = next((w for w in ordered if w.order >= self._rr_next), ordered[0])
            return pick.id, False, False
        home = self.affinity.get(job.session) if job.session is not None else None
        spilled = False
        if home is not None and home in self.workers and self.workers[home] in eligible:
            if self.workers[home].free > 0:
                return home, True, False
            if now < job.spill_at:
                return None
            spilled = True
        if not free:
            return None
        preferred = self.workers.get(job.prefer) if job.prefer is not None else None
        if preferred is not None and preferred in free and self._within_bound(preferred, eligible):
            return preferred.id, False, spilled
        best = min(free, key=lambda w: (-w.free, w.busy / w.slots, w.warm, w.order))
        return best.id, False, spilled

    def _within_bound(self, view: WorkerView, eligible: list[WorkerView]) -> bool:
        """Would one more conversation keep `view` within the load bound?"""
        # Consistent hashing with bounded loads: a worker's share of the requests running
        # and of the conversations it holds (this one included) may exceed its share of
        # the slots by the load factor. Without the second, conversations arriving while
        # a worker happens to be idle would all make it their home.
        total_slots = sum(w.slots for w in eligible)
        factor = self.config.prefix_load_factor * view.slots / total_slots
        busy_cap = math.ceil(factor * (sum(w.busy for w in eligible) + 1))
        warm_cap = math.ceil(factor * (sum(w.warm for w in eligible) + 1))
        return view.busy + 1 <= busy_cap and view.warm + 1 <= warm_cap

    def _drop_worker(self, worker: WorkerId, now: float, reason: str) -> list[Action]:
        view = self.workers.pop(worker)
        actions: list[Action] = [WorkerDead(worker, reason)]
        for session in [s for s, w in self.affinity.items() if w == worker]:
            del self.affinity[session]
        requeue: list[RequestId] = []
        for job_id in view.jobs:
            job = self.jobs[job_id]
            if job.abandoned:
                del self.jobs[job_id]
            elif job.streamed and not (
                job.resumable and job.failovers < self.config.max_failovers
            ):
                del self.jobs[job_id]
                actions.append(Fail(job_id, ErrorCode.WORKER_LOST,
                                    f"the worker was lost mid-answer ({reason})"))
            else:
                job.failovers += job.streamed
                job.worker = None
                requeue.append(job_id)
        # Re-dispatched requests go first: they have waited longest.
        for job_id in sorted(requeue, key=lambda j: self.jobs[j].arrived, reverse=True):
            self.queue.appendleft(job_id)
        return actions

    def _unqueue(self, job_id: RequestId) -> None:
        try:
            self.queue.remove(job_id)
        except ValueError:
            pass

    def _set_affinity(self, session: SessionId, worker: WorkerId) -> None:
        old = self.affinity.get(session)
        if old is not None and old in self.workers:
            self.workers[old].warm -= 1
        self.affinity[session] = worker
        self.affinity.move_to_end(session)
        self.workers[worker].warm += 1
        while len(self.affinity) > self.config.max_sessions:
            self._drop_affinity(next(iter(self.affinity)))
            self.sessions_forgotten += 1

    def _drop_affinity(self, session: SessionId) -> None:
        worker = self.affinity.pop(session)
        if worker in self.workers:
            self.workers[worker].warm -= 1
