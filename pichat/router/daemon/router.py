"""The router daemon: two ROUTER sockets, the scheduler, heartbeats, and the HTTP face.

Clients connect to `clients_bind` (pichat/router/daemon/clients.py), workers to
`workers_bind` (pichat/router/daemon/workers.py); the HTTP face (pichat/router/api/app.py)
submits requests in-process through `Router.submit`. Every decision about where a request
runs is the scheduler's (pichat/router/policy/scheduler.py), and the scheduler's records are the
router's one registry of workers and requests; whether a request is taken, and as what,
is admission's (pichat/router/policy/admission.py). This module runs the loops, moves bytes, and
carries out the scheduler's actions, in order: an action that fails (a send to a worker
that is gone) becomes an event handled after the current batch, never a call back into it.

CHUNK and DONE frames from a worker are forwarded to a ZeroMQ client as they arrived
(after validation): the router never re-encodes the stream.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, deque
from dataclasses import replace
from typing import Any

import zmq
from aiohttp import web

from pichat import __version__
from pichat.config import RouterConfig, check_exposure
from pichat.daemon import give_big_buffers_back, on_stop_signals, raise_fd_limit
from pichat.discovery import Announcer
from pichat.errors import ErrorCode
from pichat.health import HealthEndpoint
from pichat.logs import Throttle
from pichat.memory import open_store
from pichat.memory.etcd import EtcdStore
from pichat.memory.store import Limits
from pichat.protocol import Cancel, Chunk, Disconnect, Done, Error, Request, RequestId, encode
from pichat.ready import announce_ready
from pichat.router.api.app import start_http
from pichat.router.api.embedbatch import EmbedBatcher
from pichat.router.daemon import roster
from pichat.router.daemon.clients import ClientSide
from pichat.router.daemon.election import Election
from pichat.router.daemon.joins import JoinDesk
from pichat.router.daemon.keyring import KeyRing
from pichat.router.daemon.memory import Memory
from pichat.router.daemon.migration import Migrations
from pichat.router.daemon.workers import HEARTBEAT, WorkerSide
from pichat.router.observe.floating import FloatingAddress, keep_record
from pichat.router.observe.metrics import RouterMetrics, watch_loop_lag
from pichat.router.observe.snapshot import snapshot
from pichat.router.observe.stats import Stats
from pichat.router.policy.admission import Refused, admit
from pichat.router.policy.identity import Leases, NameBook
from pichat.router.policy.jobs import ClientJob, ReplySink
from pichat.router.policy.prefix import PrefixIndex
from pichat.router.policy.ratelimit import RateLimit
from pichat.router.policy.scheduler import (
    Action,
    CancelOnWorker,
    Dispatch,
    Fail,
    Placement,
    Scheduler,
    WorkerDead,
    WorkerId,
    WorkerView,
)
from pichat.security import Gatekeeper
from pichat.transport import Channel, configure, port_of

__all__ = ["Router"]

log = logging.getLogger(__name__)

_FRAMES = 4
"""A routing id and the protocol's three frames: more and the message is dropped unread."""
_CLIENT_HWM = 1_000
"""Messages queued per client connection each way (a client that stops reading is cut
off at this many, not at 100,000 snapshots)."""
_WORKER_HWM = 10_000
_INSECURE_LEASE_SECRET = b"pichat: no keys, no secrets"
"""Without keys there is no identity to bind a lease to; leases then only keep honest
workers' claims working across router restarts."""


class Router:
    """`await Router(config).run()` serves until cancelled or signalled."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(replace(config.scheduler,
                                           migration=config.migration == "auto"))
        self.stats = Stats()
        self.prefixes = PrefixIndex(max_entries=4 * config.scheduler.max_sessions)
        self.metrics = RouterMetrics(self.stats, self.snapshot)
        secret = config.keys.pair("router")[1] if config.keys else _INSECURE_LEASE_SECRET
        self.leases = Leases(secret)
        self.migrations = Migrations(self, self._release_held)
        self.names = NameBook()
        self.registrations: Counter[str] = Counter()
        """READYs per worker name: more than one is a restart or a reconnect."""
        self.throttle = Throttle(log, config.log_repeat_window)
        self.status_limit = RateLimit(config.status_per_s, 2 * config.status_per_s)
        self.workerside = WorkerSide(self)
        self.clientside = ClientSide(self)
        self.memory = Memory(self, None)
        self.started = time.time()
        self.clients_endpoint = self.workers_endpoint = self.http_endpoint = ""
        self.join_endpoint = ""
        self.joins = JoinDesk(self)
        self.embedder = EmbedBatcher(self.submit)
        self.clients_channel: Channel | None = None
        self.workers_channel: Channel | None = None
        self.gatekeeper: Gatekeeper | None = None
        self.keyring: KeyRing | None = None
        """The keys directory kept alike with other routers' (with --db etcd://)."""
        self.floating = (FloatingAddress(config.floating_address)
                         if config.floating_address else None)
        self.election: Election | None = None
        """With the floating address and --db etcd://: whether this router may hold it
        (pichat/router/daemon/election.py; GET /health/floating)."""
        if self.floating is not None:
            self.floating.check()
        self.http_site: Any = None
        self.ready = asyncio.Event()
        """Set once everything it serves is up (endpoints known)."""
        self.version = 0
        """Bumped by every event that may change the snapshot."""
        self.loop_lag = (0.0, 0.0)
        """(latest, highest in the last minute) seconds the event loop ran late."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._accepting = True
        self._pending: deque[Action] = deque()
        self._unreachable: deque[tuple[WorkerId, str]] = deque()
        self._applying = False
        self._idle = asyncio.Event()
        """Set whenever no client waits for an answer (what a drain waits for)."""

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        check_exposure(self.config)
        raise_fd_limit()
        give_big_buffers_back()
        loop = self._loop = asyncio.get_running_loop()
        self.scheduler.started = loop.time()
        cfg = self.config
        ctx = zmq.Context()
        clients, workers = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
        joins: zmq.Socket | None = None
        announcer: Announcer | None = None
        stop = asyncio.Event()
        health: HealthEndpoint | None = None
        http: web.AppRunner | None = None
        try:
            configure(clients, max_message_bytes=cfg.max_message_bytes, hwm=_CLIENT_HWM)
            configure(workers, max_message_bytes=cfg.max_message_bytes, hwm=_WORKER_HWM)
            clients.copy_threshold = 0  # copy=False sends share the buffer (cached STATUS)
            if cfg.keys is not None:
                self.gatekeeper = Gatekeeper(ctx, cfg.keys, loop,
                                             log_window=cfg.log_repeat_window)
                cfg.keys.secure_server(clients, "clients")
                cfg.keys.secure_server(workers, "workers")
            clients.bind(cfg.clients_bind)
            workers.bind(cfg.workers_bind)
            self.clients_endpoint = clients.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.floating is not None:
                # As the other routers and clients reach it, not as bound (0.0.0.0).
                shown = (roster.reachable(self.clients_endpoint)
                         if self.clients_endpoint.startswith("tcp://") else self.clients_endpoint)
                self.floating.name = f"{socket.gethostname()} {shown}"
            self.workers_endpoint = workers.getsockopt_string(zmq.LAST_ENDPOINT)
            if cfg.keys is not None and cfg.join_bind.lower() not in ("", "off", "none"):
                joins = ctx.socket(zmq.ROUTER)
                configure(joins, max_message_bytes=64 * 1024, hwm=64)
                cfg.keys.secure_server(joins, "join")
                joins.bind(cfg.join_bind)
                self.join_endpoint = joins.getsockopt_string(zmq.LAST_ENDPOINT)
            if cfg.db.lower() not in ("", "off", "none"):
                limits = Limits(conversations_per_owner=cfg.db_max_conversations,
                                max_bytes=cfg.db_max_mb << 20)
                self.memory = Memory(self, await open_store(cfg.db, limits))
                log.info("conversations kept in %s", self.memory.path)
                if cfg.keys is not None and isinstance(self.memory.store, EtcdStore):
                    self.keyring = KeyRing(self.memory.store, cfg.keys.directory,
                                           interval=cfg.heartbeat_interval / 4,
                                           on_change=self._keys_changed,
                                           log_window=cfg.log_repeat_window)
                    await self.keyring.sync()
                    log.info("keys directory %s shared with the other routers on %s "
                             "(%d shared files)", cfg.keys.directory, self.memory.path,
                             len(self.keyring.agreed))
                    # Before "ready": a Pi joining through another router from now on is
                    # told of this one.
                    await roster.publish(self.memory.store, self.workers_endpoint,
                                         self.clients_endpoint)
                if self.floating is not None and isinstance(self.memory.store, EtcdStore):
                    self.election = Election(self.memory.store, self.floating.address,
                                             self.floating.name)
                    await self.election.round()  # before "ready": the check answers true
            if cfg.keys is not None and cfg.discovery:
                announcer = Announcer(cfg.keys.router_public().decode(), {
                    "workers": port_of(self.workers_endpoint),
                    "clients": port_of(self.clients_endpoint),
                    **({"join": port_of(self.join_endpoint)} if self.join_endpoint else {})})
                try:
                    await announcer.start()
                except (OSError, RuntimeError) as exc:
                    log.warning("cannot announce the router on the LAN: %s", exc)
            if cfg.health_bind:
                health = HealthEndpoint(ctx, cfg.health_bind, self._health, loop)
            if cfg.http:
                http, self.http_site = await start_http(self)
                self.http_endpoint = "http://{}:{}".format(*self.http_site.address)
                log.info("HTTP on %s (OpenAI API at /v1, chat page at /, metrics at /metrics)%s",
                         self.http_endpoint, ", API keys required" if cfg.api_keys else "")
            if handle_signals:
                on_stop_signals(loop, lambda name: self._stop(name, stop))
            # Only now, with everything it serves up, does the router read its sockets
            # (what arrived meanwhile waits in ZeroMQ): a STATUS answered from here on
            # names every endpoint.
            self.workers_channel = Channel(workers, self.workerside.on_message, loop,
                                           max_frames=_FRAMES, identify=True,
                                           on_dropped=self.workerside.on_dropped)
            self.clients_channel = Channel(clients, self.clientside.on_message, loop,
                                           max_frames=_FRAMES, identify=True,
                                           on_dropped=self.clientside.on_dropped)
            if joins is not None:
                self.joins.channel = Channel(joins, self.joins.on_message, loop,
                                             max_frames=4, identify=True)
            log.info("router %s: clients on %s, workers on %s, policy %s", __version__,
                     self.clients_endpoint, self.workers_endpoint, cfg.policy)
            self.ready.set()
            announce_ready(cfg.ready_file, {"clients": self.clients_endpoint,
                                            "workers": self.workers_endpoint,
                                            "http": self.http_endpoint,
                                            "join": self.join_endpoint})
            async with asyncio.TaskGroup() as tasks:
                heartbeats = tasks.create_task(self._heartbeat_loop(), name="heartbeats")
                lag = tasks.create_task(watch_loop_lag(self._on_lag), name="loop-lag")
                keyring = (tasks.create_task(self.keyring.run(), name="keyring")
                           if self.keyring is not None else None)
                published = (tasks.create_task(roster.keep_published(
                    self.memory.store, self.workers_endpoint, self.clients_endpoint),
                    name="roster") if self.keyring is not None else None)
                election = (tasks.create_task(self.election.run(), name="election")
                            if self.election is not None else None)
                record = (tasks.create_task(keep_record(
                    self.floating, self.memory.store, cfg.heartbeat_interval,
                    self._failed_over), name="floating-record")
                    if self.election is not None else None)  # (the same condition)
                await stop.wait()
                await self._drain()
                heartbeats.cancel()
                lag.cancel()
                for task in (keyring, record, published, election):
                    if task is not None:
                        task.cancel()
        finally:
            if announcer is not None:
                await announcer.close()
            await self.memory.close()
            if self.gatekeeper is not None:
                self.gatekeeper.close()
            if http is not None:
                await http.cleanup()
            if health is not None:
                health.close()
            if self._timer is not None:
                self._timer.cancel()
            for channel in (self.clients_channel, self.workers_channel, self.joins.channel):
                if channel is not None:
                    channel.close()
            if joins is not None:
                joins.close(linger=0)
            clients.close(linger=0)
            workers.close(linger=0)
            ctx.term()
            log.info("router stopped")

    def _stop(self, signal_name: str, stop: asyncio.Event) -> None:
        log.info("%s: draining %d running requests (up to %.0fs); signal again to stop now",
                 signal_name, self.active(), self.config.drain_timeout)
        self._accepting = False
        stop.set()

    async def _drain(self) -> None:
        self._accepting = False
        self._check_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except TimeoutError:
            pass
        for job_id, job in list(self.scheduler.jobs.items()):
            if job.client is not None:
                self.fail_client(job_id, ErrorCode.NO_WORKERS, "router shutting down")

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            for worker in list(self.scheduler.workers):
                self.send_worker(worker, HEARTBEAT)
            sinks = {job.client.sink.key: (job_id, job.client.sink)
                     for job_id, job in self.scheduler.jobs.items() if job.client is not None}
            for job_id, sink in sinks.values():
                if not sink.keepalive():
                    self.cancel(job_id)
            if self.floating is not None and self.floating.check():
                self.changed()
            now = self.now()
            self.throttle.flush(now)
            if self.gatekeeper is not None:
                self.gatekeeper.throttle.flush(now)
                self._revoke(self.gatekeeper.revoked(now))

    def _failed_over(self, seconds: float) -> None:
        """The floating address came here from another router (pichat/router/observe/
        floating.py): `seconds` with no holder."""
        self.metrics.failover.observe(seconds)
        self.changed()

    def _keys_changed(self) -> None:
        """Another router admitted or revoked a key (pichat/router/daemon/keyring.py)."""
        if self.gatekeeper is not None:
            self._revoke(self.gatekeeper.revoked(self.now()))

    def _revoke(self, revoked: dict[str, set[str]]) -> None:
        """Keys taken away: their workers leave now (their requests are placed again);
        their messages, workers' and clients', are ignored from now on (the sockets'
        message handlers ask `Gatekeeper.admits`)."""
        names = revoked.get("workers", set())
        for worker, view in list(self.scheduler.workers.items()):
            if view.meta is not None and view.meta.identity in names:
                log.warning("worker %s: its key %r was revoked; disconnected",
                            view.meta.ready.worker, view.meta.identity)
                self.stats.events["revoked_workers"] += 1
                self.send_worker(worker, encode(Disconnect("your key was revoked")))
                self.apply(self.scheduler.remove_worker(worker, self.now(), "key revoked"))
        for domain, gone in revoked.items():
            log.warning("%s revoked: %s", domain, ", ".join(sorted(gone)))

    def _on_lag(self, lag: float, worst: float) -> None:
        self.loop_lag = (lag, worst)
        self.metrics.loop_lag.observe(lag)

    # --- the face: what clients and the HTTP face use ---------------------------------

    def submit(self, request: Request, sink: ReplySink, *, owner: str = "") -> None:
        """Accept a request of `owner`; its chunks, DONE or ERROR go to `sink`."""
        self.changed()
        if request.conversation is not None and self._accepting:
            self.memory.submit(request, sink, owner)  # it comes back here with its history
            return
        existing = self.scheduler.jobs.get(request.id)
        if existing is not None:
            if existing.client is not None and existing.client.sink.key == sink.key:
                return  # the client sent it again (it thought us gone): already on it
            self._refuse(sink, request.id, ErrorCode.BAD_REQUEST,
                         f"request id {request.id!r} is already in use")
            return
        if not self._accepting:
            sink.deliver(Error(request.id, ErrorCode.NO_WORKERS, "router shutting down"), None)
            return
        cfg = self.config
        decision = admit(request, owner, isolate=cfg.isolate_cache,
                         prefixes=self.prefixes if cfg.policy == "affinity" else None,
                         max_prompt_chars=cfg.max_prompt_chars,
                         max_message_bytes=cfg.max_message_bytes)
        if isinstance(decision, Refused):
            self.stats.rejected[decision.reason] += 1
            self._refuse(sink, request.id, decision.code, decision.message)
            return
        self.stats.events["requests"] += 1
        self.stats.events["prefix_continuations"] += decision.continued
        request = decision.request
        now = self.now()
        prefer = self.scheduler.warm_worker(decision.shared) if decision.shared else None
        self.apply(self.scheduler.submit(
            request.id, request.session, now, model=request.model, timeout=request.timeout,
            prefer=prefer, owner=owner, client=ClientJob(sink, request, now, owner=owner),
            prompt_chars=decision.chars, max_tokens=request.sampling.max_tokens,
            embed=bool(request.embed)))

    def cancel(self, job_id: RequestId) -> None:
        """The submitter gave up on the request: stop it, send nothing more."""
        self.changed()
        if self.detach(job_id) is not None:
            self.stats.outcomes["cancelled"] += 1
            self.apply(self.scheduler.cancel(job_id, self.now()))

    def snapshot(self) -> dict[str, Any]:
        """The cluster as `pichat status --json` shows it."""
        return snapshot(self)

    def served_models(self) -> dict[str, float]:
        """Each model live workers serve, and when its first worker joined."""
        models: dict[str, float] = {}
        for view in self.scheduler.workers.values():
            if view.meta is not None:
                joined = models.get(view.model, view.meta.joined)
                models[view.model] = min(joined, view.meta.joined)
        return models

    def worker_facts(self) -> list[tuple[Any, float]]:
        """(READY, when it joined) of each live worker, in registration order."""
        return [(v.meta.ready, v.meta.joined) for v in
                sorted(self.scheduler.workers.values(), key=lambda v: v.order)
                if v.meta is not None]

    def worker_count(self) -> int:
        return len(self.scheduler.workers)

    @property
    def workers(self) -> dict[WorkerId, WorkerView]:
        """The registered workers (the scheduler's records; `.meta` holds the rest)."""
        return self.scheduler.workers

    def active(self) -> int:
        """Requests whose client waits for an answer."""
        return sum(job.client is not None for job in self.scheduler.jobs.values())

    # --- what the two sides share -----------------------------------------------------

    def client(self, job_id: RequestId) -> ClientJob | None:
        """The client side of a request whose client still waits for it."""
        job = self.scheduler.jobs.get(job_id)
        return job.client if job is not None else None

    def detach(self, job_id: RequestId) -> ClientJob | None:
        """Take the client off a request (it was answered); the scheduler keeps the rest."""
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.client is None:
            return None
        client, job.client = job.client, None
        self._check_idle()
        return client

    def deliver(self, job_id: RequestId, message: Chunk | Done | Error,
                frames: list[bytes] | None) -> None:
        client = self.client(job_id)
        if client is not None and not client.sink.deliver(message, frames):
            self.cancel(job_id)

    def fail_client(self, job_id: RequestId, code: ErrorCode, message: str,
                    client: ClientJob | None = None) -> None:
        """Answer the client with an ERROR (`client`: when the scheduler has already
        forgotten the request)."""
        client = self.detach(job_id) or client
        if client is not None:
            self.stats.outcomes[code.value] += 1
            client.sink.deliver(Error(job_id, code, message), None)

    def _refuse(self, sink: ReplySink, job_id: RequestId, code: ErrorCode, text: str) -> None:
        self.stats.outcomes[code.value] += 1
        sink.deliver(Error(job_id, code, text), None)

    def send_client(self, client: bytes, frames: list[bytes], copy: bool = True) -> bool:
        assert self.clients_channel is not None
        try:
            self.clients_channel.send([client, *frames], copy=copy)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client disconnected; EAGAIN: it stopped reading.
            gone = [job_id for job_id, job in self.scheduler.jobs.items()
                    if job.client is not None and job.client.sink.key == client]
            if gone:
                log.info("client %s unreachable (%s): cancelling %d requests", client.hex(),
                         exc.strerror, len(gone))
            for job_id in gone:
                self.stats.events["client_gone"] += 1
                self.cancel(job_id)
            return False

    def send_worker(self, worker: WorkerId, frames: list[bytes]) -> bool:
        assert self.workers_channel is not None
        try:
            self.workers_channel.send([worker, *frames])
            return True
        except zmq.ZMQError as exc:
            # The connection is gone (EHOSTUNREACH) or stuck (EAGAIN): dead, as if silent.
            # An event for after the current batch of actions, not a call back into it.
            self._unreachable.append((worker, f"unreachable ({exc.strerror})"))
            self.apply([])
            return False

    def changed(self) -> None:
        self.version += 1

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    # --- actions and time -------------------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        """Carry out the scheduler's actions in order. Actions that come up meanwhile (a
        send failed, a worker is gone) are queued behind them, never run in the middle."""
        self._pending.extend(actions)
        if self._applying:
            return
        self._applying = True
        try:
            while self._pending or self._unreachable:
                if self._pending:
                    self._carry_out(self._pending.popleft())
                else:
                    worker, reason = self._unreachable.popleft()
                    self._pending.extend(self.scheduler.remove_worker(worker, self.now(),
                                                                      reason))
        finally:
            self._applying = False
        self._arm_timer()
        self._check_idle()

    def _carry_out(self, action: Action) -> None:
        match action:
            case Dispatch(job=job_id, worker=worker, how=how, warm_on=warm_on):
                client = self.client(job_id)
                if client is None:  # answered meanwhile: never sent, so free the slot
                    self._pending.extend(self.scheduler.finished(job_id, self.now()))
                    return
                if how is Placement.FAILOVER:
                    client.continue_elsewhere()
                    log.warning("req=%s failover: continuing on worker %s after %d tokens "
                                "(%d chunks)", job_id, self.workerside.name(worker),
                                client.cursor.resumed, client.cursor.chunks)
                self.stats.placements[how] += 1
                session = client.request.session
                log.debug("req=%s session=%s -> worker=%s (%s)", job_id, session,
                          self.workerside.name(worker), how.value)
                if (warm_on is not None and session is not None
                        and self.config.migration == "auto"
                        and self.migrations.worth_it(warm_on, worker)):
                    # The REQUEST waits for the state (pichat/router/daemon/migration.py).
                    self.migrations.start(job_id, session, client.request.owner, warm_on,
                                          worker, self.now())
                    return
                self.send_worker(worker, self._request_frames(client, worker))
            case Fail(job=job_id, code=code, message=message, client=client):
                self.fail_client(job_id, code, message, client)
            case CancelOnWorker(job=job_id, worker=worker):
                self.send_worker(worker, encode(Cancel(job_id)))
            case WorkerDead():
                self.workerside.lost(action)

    def _release_held(self, job_id: RequestId, worker: WorkerId) -> None:
        """A state transfer ended: send the request it held back, unless the request was
        answered, cancelled or moved meanwhile (then free the slot it held, if it still
        does)."""
        job = self.scheduler.jobs.get(job_id)
        if job is None or job.worker != worker:
            return
        client = job.client
        if client is None or job.abandoned:
            self.apply(self.scheduler.finished(job_id, self.now()))
            return
        self.send_worker(worker, self._request_frames(client, worker))

    def _request_frames(self, client: ClientJob, worker: WorkerId) -> list[bytes]:
        """The REQUEST for `worker`, with its lease on the session."""
        request = client.outgoing or client.request
        meta = self.workerside.meta(worker)
        if request.session is not None and meta is not None:
            request = replace(request, lease=self.leases.sign(meta.lease_holder, request.session))
        return encode(request)

    def _check_idle(self) -> None:
        """While draining: is any client still waiting?"""
        if not self._accepting and not self.active():
            self._idle.set()

    def _tick(self) -> None:
        self._timer = None
        self.changed()
        if self.workers_channel is not None:
            # Read what the workers sent before judging them silent: a burst of costly
            # client messages may have kept the loop from their heartbeats.
            self.workers_channel.drain_now()
        self.migrations.tick(self.now())
        self.apply(self.scheduler.tick(self.now()))

    def _arm_timer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        wakes = [w for w in (self.scheduler.next_wakeup(self.now()),
                             self.migrations.next_wakeup()) if w is not None]
        if not wakes:
            return
        wake = min(wakes)
        if self._timer is not None:
            if self._timer.when() <= wake:
                return
            self._timer.cancel()
        self._timer = loop.call_at(wake, self._tick)

    def _health(self) -> dict[str, Any]:
        return {"role": "router", "healthy": self._accepting,
                "workers": len(self.scheduler.workers), "active": self.active(),
                "queue": self.scheduler.queue_depth}

