"""What the scheduler works with: its settings, its records of workers and requests (the
router's one registry of each), and the actions it asks the router to carry out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NewType, TypeAlias

from pichat.errors import ErrorCode
from pichat.protocol import RequestId, SessionId
from pichat.router.policy.costs import Speed

__all__ = [
    "Policy", "POLICIES", "WorkerId", "SchedulerConfig", "Placement", "Dispatch", "Fail",
    "CancelOnWorker", "WorkerDead", "Action", "Job", "WorkerView",
]

Policy: TypeAlias = Literal["affinity", "round-robin"]
POLICIES: tuple[Policy, ...] = ("affinity", "round-robin")

WorkerId = NewType("WorkerId", bytes)
"""The worker's ZeroMQ routing id on the router's worker socket."""


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: Policy = "affinity"
    affinity_wait: float = 30.0
    """Seconds a request waits for its busy warm worker at most: sooner, it goes elsewhere
    when that is expected to start it sooner (pichat/router/policy/costs.py)."""
    migration: bool = True
    """States may move between workers (else a conversation placed elsewhere is read
    again): what going elsewhere is expected to cost."""
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
    startup_grace: float = 10.0
    """Seconds after the router starts (`Scheduler.started`) in which a request finding no
    worker waits for one instead of failing with `no_workers` at once: after a router
    restart, the workers register again within a few heartbeats."""
    owner_max_running: int = 0
    """Requests one owner may have running at once (0: as many as there are slots)."""
    owner_max_queued: int = 0
    """Requests one owner may have waiting (0: any share of the queue others leave)."""
    cancel_grace: float = 10.0
    """Seconds a worker has to confirm a cancel before the router frees the slot itself."""


class Placement(StrEnum):
    """Why a request went where it went (decided once, here, in this order)."""

    FAILOVER = "failover"
    """It had streamed part of its answer on a worker now gone: send it as a continuation."""
    RETRY = "retry"
    """Sent again after its first worker died or refused it (nothing had streamed)."""
    AFFINITY = "affinity"
    """Its session's warm worker."""
    PREFIX = "prefix"
    """The worker holding a prefix it shares (a system prompt), within the load bound."""
    SPILL = "spill"
    """Its warm worker stayed busy too long: the least loaded worker instead."""
    LOAD = "load"
    """A new session: the least loaded worker."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the request to the worker."""

    job: RequestId
    worker: WorkerId
    how: Placement = Placement.LOAD
    warm_on: WorkerId | None = None
    """Another worker, alive, that holds the session warm (its state could move)."""


@dataclass(frozen=True, slots=True)
class Fail:
    """Answer the client with an ERROR and forget the request."""

    job: RequestId
    code: ErrorCode
    message: str
    client: Any = None
    """The request's `Job.client` (the scheduler has forgotten the job)."""


@dataclass(frozen=True, slots=True)
class CancelOnWorker:
    """Tell the worker to stop generating the request (its slot frees when it confirms)."""

    job: RequestId
    worker: WorkerId


@dataclass(frozen=True, slots=True)
class WorkerDead:
    worker: WorkerId
    reason: str
    meta: Any = None
    """The worker's `WorkerView.meta` (the scheduler has forgotten the worker)."""


Action: TypeAlias = Dispatch | Fail | CancelOnWorker | WorkerDead


@dataclass(slots=True)
class Job:
    id: RequestId
    session: SessionId | None
    model: str | None
    arrived: float
    queue_deadline: float
    deadline: float
    spill_at: float
    """When it stops waiting for its busy warm worker, whatever the estimates say."""
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
    embed: bool = False
    """An embeddings request: an embedding-only worker may take it (and nothing else)."""
    attempts: int = 0
    owner: str = ""
    cancel_deadline: float = math.inf
    """When an abandoned request's slot is written off if the worker has not confirmed."""
    client: Any = None
    """The service's side of the request (its reply sink, its stream): opaque here. This
    job is the router's one record of the request."""
    prompt_chars: int = 0
    """Characters of conversation text (0: unknown; then it waits for its warm worker
    until `spill_at`)."""
    history: float = 0.0
    """Tokens its session's state holds where it is warm (known from the session's last
    turn, else estimated from `prompt_chars`)."""
    max_tokens: int = 0
    started: float = 0.0
    """When it was dispatched."""
    read_tokens: float = 0.0
    """Prompt tokens its worker is expected to read (those not already warm there)."""
    tokens_out: int = 0
    """Answer tokens streamed so far."""


@dataclass(slots=True)
class WorkerView:
    id: WorkerId
    model: str
    slots: int
    last_seen: float
    busy: int = 0
    elsewhere: int = 0
    """Slots busy with requests this router did not place (another router's, a worker
    serving several): what the worker's heartbeat or a "full" refusal says beyond `busy`."""
    warm: int = 0
    """Sessions whose affinity points here."""
    draining: bool = False
    embedding_only: bool = False
    """It serves an embedding model: it takes embeddings requests only."""
    order: int = 0
    jobs: set[RequestId] = field(default_factory=set)
    meta: Any = None
    """The service's facts about the worker (its READY, its heartbeats): opaque here. This
    view is the router's one record of the worker."""
    speed: Speed = field(default_factory=Speed)

    @property
    def free(self) -> int:
        return max(0, self.slots - self.busy - self.elsewhere)
