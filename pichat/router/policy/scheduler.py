"""Where each request runs: the router's routing policy, as a pure state machine.

The scheduler does no I/O and reads no clock: every method takes `now` (seconds, any
monotonic origin) and returns the `Action`s the router must carry out, in order. That
keeps the policy testable as a table of cases (tests/test_scheduler.py).

Where a request goes once a slot is free is placement's (pichat/router/policy/placement.py):
with policy `affinity` (the default) a session returns to the worker that holds it warm;
while that one is busy, the request waits for it unless a free worker is expected to start
it sooner, the conversation's state moved or its history read again included
(pichat/router/policy/costs.py: the warm worker's expected wait comes from the work left in what
it runs and in what is queued for it before this request, from measured speeds), and
never longer than `affinity_wait`; the session's affinity moves along. A new session goes
to the least loaded worker, or to one holding a prefix it shares while that worker's load
stays bounded. Policy `round-robin` (the benchmarks' baseline) ignores sessions.

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

from collections import OrderedDict, deque
from dataclasses import replace
from typing import Any

from pichat.errors import ErrorCode
from pichat.protocol import RequestId, SessionId, Usage
from pichat.router.policy.costs import (
    Estimates,
    SlotClock,
    Speed,
    bring_seconds,
    left_seconds,
    run_seconds,
)
from pichat.router.policy.placement import place
from pichat.router.policy.records import (
    POLICIES,
    Action,
    CancelOnWorker,
    Dispatch,
    Fail,
    Job,
    Placement,
    Policy,
    SchedulerConfig,
    WorkerDead,
    WorkerId,
    WorkerView,
)

__all__ = [
    "Policy",
    "POLICIES",
    "Placement",
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
        self.estimates = Estimates()
        self.history: OrderedDict[SessionId, int] = OrderedDict()
        """Tokens each session's state held after its last turn (`max_sessions` at most)."""

    # --- workers ----------------------------------------------------------------------

    def add_worker(self, worker: WorkerId, model: str, slots: int, now: float,
                   sessions: tuple[str, ...] = (), meta: Any = None,
                   speed: Speed | None = None, embedding_only: bool = False) -> list[Action]:
        """A worker announced itself (READY). A known worker re-announcing has restarted:
        whatever it was running is lost."""
        actions: list[Action] = []
        if worker in self.workers:
            actions += self._drop_worker(worker, now, "worker re-registered")
        self._registrations += 1
        self.workers[worker] = WorkerView(worker, model, slots, now, order=self._registrations,
                                          meta=meta, speed=speed or Speed(),
                                          embedding_only=embedding_only)
        for job in self.jobs.values():  # a fresh registration: it may take them now
            job.avoid.discard(worker)
        for session in sessions:
            # A session that another live worker holds went on there (its state is newer
            # than this one's, which kept an older turn, say on disk through a restart).
            if self.affinity.get(SessionId(session)) not in self.workers:
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

    def measured(self, worker: WorkerId, prompt_tps: float, decode_tps: float) -> None:
        """The worker's latest speeds (its heartbeat)."""
        view = self.workers.get(worker)
        if view is not None:
            view.speed = replace(view.speed, prompt_tps=prompt_tps, decode_tps=decode_tps)

    def forget_sessions(self, worker: WorkerId, sessions: tuple[str, ...]) -> None:
        """The worker evicted these sessions' KV state: they are no longer warm there."""
        for session in sessions:
            if self.affinity.get(SessionId(session)) == worker:
                self._drop_affinity(SessionId(session))

    def move_session(self, session: SessionId, worker: WorkerId) -> None:
        """`session`'s state now lives on `worker` (handed over by a draining worker)."""
        if worker in self.workers:
            self._set_affinity(session, worker)

    def sessions_on(self, worker: WorkerId, limit: int) -> list[SessionId]:
        """Up to `limit` sessions warm on `worker`, the most recently used first."""
        found: list[SessionId] = []
        for session in reversed(self.affinity):
            if self.affinity[session] == worker:
                found.append(session)
                if len(found) >= limit:
                    break
        return found

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
               prefer: WorkerId | None = None, owner: str = "",
               client: Any = None, prompt_chars: int = 0, max_tokens: int = 0,
               embed: bool = False) -> list[Action]:
        """A new request. The caller guarantees `job_id` is not in use. `prompt_chars`
        (the conversation's text) and `max_tokens` size it for the cost estimates."""
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
            client=client,
            prompt_chars=prompt_chars,
            max_tokens=max_tokens,
            embed=embed,
        )
        if session is not None and session in self.history:
            job.history = self.history[session]
        else:  # at most the whole conversation
            job.history = prompt_chars * self.estimates.tokens_per_char
        if not self._serving(model, embed):
            grace_end = self.started + cfg.startup_grace
            if now >= grace_end or (model and self.workers):
                return [self._no_workers(job)]
            job.queue_deadline = min(job.queue_deadline, grace_end)  # wait for them
        actions: list[Action] = []
        waiting = self._queued_by_owner()
        mine = len(waiting.get(owner, ()))
        if cfg.owner_max_queued and mine >= cfg.owner_max_queued:
            return [Fail(job_id, ErrorCode.BUSY,
                         f"you have {mine} requests waiting already (at most "
                         f"{cfg.owner_max_queued}); retry later", client)]
        if (len(self.queue) >= cfg.queue_limit
                and self._place(job, now, self._home_waits(now, job)) is None):
            hog = max(waiting, key=lambda o: len(waiting[o]), default=None)
            if hog is None or len(waiting[hog]) <= mine + 1:
                return [Fail(job_id, ErrorCode.BUSY,
                             f"all slots busy and {len(self.queue)} requests queued; retry later",
                             client)]
            victim = self.jobs.pop(waiting[hog][-1])  # its newest: it has waited least
            self._unqueue(victim.id)
            self.pushed_out += 1
            actions.append(Fail(victim.id, ErrorCode.BUSY,
                                "the queue is full and other clients are waiting; your share "
                                "of it is used up: retry later", victim.client))
        self.jobs[job_id] = job
        self.queue.append(job_id)
        return actions + self._pump(now)

    def chunk_seen(self, job_id: RequestId, resumable: bool = True, tokens: int = 1) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.streamed = True
            job.resumable = job.resumable and resumable
            job.tokens_out += tokens

    def bounce(self, job_id: RequestId, now: float, full: bool = False) -> list[Action]:
        """The worker refused the request before starting it: queue it again, at the head
        (a streamed one as a continuation, as before). `full`: every slot of the worker is
        taken (by another router's requests): it counts as full until its next heartbeat
        says otherwise, and may take the request then. Else (draining, resetting) the
        request avoids it until it registers again, and after three such refusals the
        request fails with `busy`."""
        job = self.jobs.get(job_id)
        if job is None or job.worker is None:
            return []
        view = self.workers.get(job.worker)
        if view is not None:
            view.busy -= 1
            view.jobs.discard(job_id)
            if full:
                view.elsewhere = max(view.elsewhere, view.slots - view.busy)
        if not full:
            job.avoid.add(job.worker)
            job.bounces += 1
        job.worker = None
        if job.bounces > 3:
            del self.jobs[job_id]
            return [Fail(job_id, ErrorCode.BUSY, "workers refused the request; retry later",
                         job.client)]
        self.queue.appendleft(job_id)
        return self._pump(now)

    def occupied(self, worker: WorkerId, busy: int, now: float) -> list[Action]:
        """The worker's heartbeat says `busy` of its slots are in use, this router's
        requests among them. Slots a "full" refusal counted as another router's that are
        free now let the queue go on. A heartbeat never counts more (a slot is released a
        moment after its answer's DONE: a heartbeat between the two must not hold the
        next request back)."""
        view = self.workers.get(worker)
        if view is None or not view.elsewhere:
            return []
        before = view.elsewhere
        view.elsewhere = min(before, max(0, min(view.slots, busy) - view.busy))
        return self._pump(now) if view.elsewhere < before else []

    def finished(self, job_id: RequestId, now: float, usage: Usage | None = None) -> list[Action]:
        """The worker ended the request (DONE, with its `usage`, or ERROR): its slot is
        free again."""
        job = self.jobs.pop(job_id, None)
        if job is None:
            return []
        if usage is not None and job.failovers == 0:
            answer = usage.completion_tokens
            self.estimates.learn(job.prompt_chars, usage.prompt_tokens,
                                 min(answer, job.max_tokens) if job.max_tokens else answer)
            if job.session is not None:
                self.history[job.session] = usage.prompt_tokens + usage.completion_tokens
                self.history.move_to_end(job.session)
                while len(self.history) > self.config.max_sessions:
                    self.history.popitem(last=False)
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
                                    f"no slot became free within {waited:.0f}s", job.client)
                               if self._serving(job.model, job.embed) else self._no_workers(job))
            elif job.worker is not None and not job.abandoned and now >= job.deadline:
                self._abandon(job, now)
                actions.append(Fail(job.id, ErrorCode.TIMEOUT,
                                    f"not finished within {now - job.arrived:.0f}s", job.client))
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

    def _serving(self, model: str | None, embed: bool = False) -> bool:
        """Is a worker that takes new work (of `model`, if named; chat, or `embed`)
        connected?"""
        return any((model is None or w.model == model) and not w.draining
                   and (embed or not w.embedding_only) for w in self.workers.values())

    def _no_workers(self, job: Job) -> Fail:
        what = f"serving model {job.model!r}" if job.model and self.workers else "connected"
        return Fail(job.id, ErrorCode.NO_WORKERS, f"no worker {what}", job.client)

    def _place(self, job: Job, now: float,
               waits: dict[RequestId, float]) -> tuple[WorkerId, bool, bool] | None:
        wait = waits.get(job.id)
        if wait is None or not (job.prompt_chars or job.session in self.history):
            return place(job, self.workers, self.affinity, self.config, self._rr_next, now)

        def spill_pays(home: WorkerView, other: WorkerView) -> bool:
            bring = bring_seconds(job.history, home.speed, other.speed,
                                  self.estimates.link_bps, self.config.migration)
            return bring < wait

        return place(job, self.workers, self.affinity, self.config, self._rr_next, now,
                     spill_pays)

    def _home_waits(self, now: float, extra: Job | None = None) -> dict[RequestId, float]:
        """For each queued request (and `extra`, as if queued last) whose warm worker is
        busy: seconds until that worker is expected to have a slot for it, the requests
        queued before it for the same worker served first."""
        if self.config.policy != "affinity":
            return {}
        est = self.estimates
        clocks: dict[WorkerId, SlotClock] = {}
        waits: dict[RequestId, float] = {}
        queued = [self.jobs[j] for j in self.queue] + ([extra] if extra is not None else [])
        for job in queued:
            home = self.affinity.get(job.session) if job.session is not None else None
            view = self.workers.get(home) if home is not None else None
            if view is None or view.draining or view.free > 0:
                continue
            clock = clocks.get(view.id)
            if clock is None:
                clock = clocks[view.id] = SlotClock(view.slots, [
                    left_seconds(self.jobs[j], view.speed, est, now) for j in view.jobs])
            waits[job.id] = clock.next_free()
            clock.take(run_seconds(self._new_tokens(job), est.answer(job.max_tokens),
                                   view.speed))
        return waits

    def _new_tokens(self, job: Job) -> float:
        """Prompt tokens of `job` not in its session's state (the new turn)."""
        return max(job.prompt_chars * self.estimates.tokens_per_char - job.history, 1.0)

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
        waits = self._home_waits(now)
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
                placed = self._place(job, now, waits)
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
            self._unqueue(job_id)
            job.worker = worker
            job.attempts += 1
            view = self.workers[worker]
            self._rr_next = view.order + 1
            view.busy += 1
            view.jobs.add(job_id)
            job.started = now
            job.read_tokens = (self._new_tokens(job) if hit
                               else job.prompt_chars * self.estimates.tokens_per_char)
            warm_on = None
            if job.session is not None:
                previous = self.affinity.get(job.session)
                if (previous is not None and previous != worker and previous in self.workers
                        and self.config.policy == "affinity"):  # round-robin: the baseline
                    warm_on = previous
                self._set_affinity(job.session, worker)
            how = (Placement.FAILOVER if job.streamed else
                   Placement.RETRY if job.attempts > 1 else
                   Placement.AFFINITY if hit else
                   Placement.PREFIX if worker == job.prefer else
                   Placement.SPILL if spilled else Placement.LOAD)
            actions.append(Dispatch(job_id, worker, how,
                                    None if job.streamed else warm_on))
        if len(self._last_served) > 2 * len(self.jobs) + 64:  # forget owners with no jobs
            owners = {job.owner for job in self.jobs.values()}
            self._last_served = {o: t for o, t in self._last_served.items() if o in owners}
        return actions

    def _drop_worker(self, worker: WorkerId, now: float, reason: str) -> list[Action]:
        view = self.workers.pop(worker)
        actions: list[Action] = [WorkerDead(worker, reason, view.meta)]
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
                                    f"the worker was lost mid-answer ({reason})", job.client))
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
