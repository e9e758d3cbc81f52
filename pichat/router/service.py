"""The router daemon: two ROUTER sockets, the scheduler, and heartbeats.

Clients connect to `clients_bind`, workers to `workers_bind`; the HTTP face
(pichat/router/http.py) submits requests in-process through `Router.submit`. Every
decision about where a request runs is the scheduler's (pichat/router/scheduler.py);
this module moves bytes, keeps each request's reply sink, and turns the scheduler's
actions into messages.

Requests without a session id get one from the prefix index (pichat/router/prefix.py):
the continuation of a conversation it has seen keeps that conversation's session.

CHUNK and DONE frames from a worker are forwarded to a ZeroMQ client as they arrived
(after validation): the router never re-encodes the stream.

Every peer may be hostile, admitted ones included (pichat/router/identity.py): requests
belong to owners, whose sessions are scoped apart and who are scheduled fairly; workers
prove their warm sessions with the router's leases and hold their names by key; STATUS is
rate-limited per client and served from a snapshot cached while nothing changes; log
lines about peers are aggregated (pichat/logs.py). The event loop's lag is measured and
reported, and before deciding that a worker is silent the router reads its socket.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import zmq
from aiohttp import web

from pichat import __version__
from pichat.config import RouterConfig
from pichat.errors import ErrorCode, PichatError, ProtocolError
from pichat.health import HealthEndpoint
from pichat.logs import Throttle, clip
from pichat.protocol import (
    Cancel,
    Chunk,
    Disconnect,
    Done,
    Error,
    Heartbeat,
    Ready,
    Request,
    RequestId,
    Status,
    decode,
    encode,
)
from pichat.ready import announce_ready
from pichat.router.identity import Leases, NameBook, owner_tag, scoped_session
from pichat.router.jobs import ClientJob, ReplySink
from pichat.router.metrics import RouterMetrics
from pichat.router.prefix import PrefixIndex
from pichat.router.ratelimit import RateLimit
from pichat.router.scheduler import (
    Action,
    CancelOnWorker,
    Dispatch,
    Fail,
    Scheduler,
    WorkerDead,
    WorkerId,
)
from pichat.security import Gatekeeper, is_loopback
from pichat.transport import Channel, configure

__all__ = ["Router"]

log = logging.getLogger(__name__)

_HEARTBEAT = encode(Heartbeat())
_UNKNOWN_WORKER = encode(Disconnect("unknown worker: send READY"))
_FRAMES = 4
"""A routing id and the protocol's three frames: more and the message is dropped unread."""
_CLIENT_HWM = 1_000
"""Messages queued per client connection each way (a client that stops reading is cut
off at this many, not at 100,000 snapshots)."""
_WORKER_HWM = 10_000
_STATUS_TTL = 1.0
"""A STATUS snapshot is reused while nothing has changed, for at most this long."""
_INSECURE_LEASE_SECRET = b"pichat: no keys, no secrets"
"""Without keys there is no identity to bind a lease to; leases then only keep honest
workers' claims working across router restarts."""


class _ZmqSink:
    __slots__ = ("router", "key")

    def __init__(self, router: Router, client: bytes) -> None:
        self.router = router
        self.key = client

    def deliver(self, message: Chunk | Done | Error, frames: list[bytes] | None) -> bool:
        return self.router._send_client(self.key, frames or encode(message))

    def keepalive(self) -> bool:
        return self.router._send_client(self.key, _HEARTBEAT)


@dataclass(slots=True)
class _WorkerInfo:
    ready: Ready
    joined: float
    heartbeat: Heartbeat
    identity: str
    """What its leases are bound to: its key's name, or (without keys) its name."""
    served: int = 0


def _give_big_buffers_back() -> None:
    """Big buffers (a peer's large frames, which libzmq allocates and CURVE decrypts)
    go back to the system when freed. glibc raises its mmap threshold to the size of the
    largest block freed so far, so after one 1 MiB frame every later one came from a heap
    that is never trimmed: measured, a router kept +64 MB after three 192 MiB multipart
    messages. A fixed threshold keeps such blocks mapped, and unmapped on free."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc
        pass


_M_MMAP_THRESHOLD = -3


def _raise_fd_limit() -> None:
    """Every connection (ZeroMQ or HTTP) costs a file descriptor: use all we may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)


class Router:
    """`await Router(config).run()` serves until cancelled or signalled."""

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.scheduler = Scheduler(config.scheduler)
        self.jobs: dict[RequestId, ClientJob] = {}
        self.workers: dict[WorkerId, _WorkerInfo] = {}
        self.counts: Counter[str] = Counter()
        self.prefixes = PrefixIndex(max_entries=4 * config.scheduler.max_sessions)
        self.metrics = RouterMetrics(self.snapshot)
        self.started = time.time()
        self.clients_endpoint = ""
        self.workers_endpoint = ""
        self.http_endpoint = ""
        self.ready = asyncio.Event()
        """Set once both sockets are bound (endpoints known)."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: Channel | None = None
        self._workers: Channel | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._told_to_register: dict[WorkerId, float] = {}
        self.gatekeeper: Gatekeeper | None = None
        self.http_site: Any = None
        self._accepting = True
        secret = config.keys.pair("router")[1] if config.keys else _INSECURE_LEASE_SECRET
        self.leases = Leases(secret)
        self.names = NameBook()
        self.registrations: Counter[str] = Counter()
        """READYs per worker name: more than one is a restart or a reconnect."""
        self.throttle = Throttle(log, config.log_repeat_window)
        self.status_limit = RateLimit(config.status_per_s, 2 * config.status_per_s)
        self._version = 0
        """Bumped by every event that may change the snapshot."""
        self._status_cache: tuple[int, float, list[bytes]] | None = None
        self.loop_lag = (0.0, 0.0)
        """(latest, highest in the last minute) seconds the event loop ran late."""

    # --- lifecycle --------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = False) -> None:
        self._check_exposure()
        _raise_fd_limit()
        _give_big_buffers_back()
        loop = self._loop = asyncio.get_running_loop()
        self.scheduler.started = loop.time()
        ctx = zmq.Context()
        clients = ctx.socket(zmq.ROUTER)
        workers = ctx.socket(zmq.ROUTER)
        stop = asyncio.Event()
        health: HealthEndpoint | None = None
        http: web.AppRunner | None = None
        keys = self.config.keys
        try:
            configure(clients, max_message_bytes=self.config.max_message_bytes,
                      hwm=_CLIENT_HWM)
            configure(workers, max_message_bytes=self.config.max_message_bytes,
                      hwm=_WORKER_HWM)
            clients.copy_threshold = 0  # copy=False sends share the buffer (cached STATUS)
            if keys is not None:
                self.gatekeeper = Gatekeeper(ctx, keys, loop,
                                             log_window=self.config.log_repeat_window)
                keys.secure_server(clients, "clients")
                keys.secure_server(workers, "workers")
            clients.bind(self.config.clients_bind)
            workers.bind(self.config.workers_bind)
            self.clients_endpoint = clients.getsockopt_string(zmq.LAST_ENDPOINT)
            self.workers_endpoint = workers.getsockopt_string(zmq.LAST_ENDPOINT)
            if self.config.health_bind:
                health = HealthEndpoint(ctx, self.config.health_bind, self._health, loop)
            if self.config.http:
                http = await self._start_http()
            if handle_signals:
                self._install_signals(loop, stop)
            # Only now, with everything it serves up, does the router read its sockets
            # (what arrived meanwhile waits in ZeroMQ): a STATUS answered from here on
            # names every endpoint.
            self._workers = Channel(workers, self._on_worker, loop, max_frames=_FRAMES,
                                    identify=True, on_dropped=self._on_dropped_worker)
            self._clients = Channel(clients, self._on_client, loop, max_frames=_FRAMES,
                                    identify=True, on_dropped=self._on_dropped_client)
            log.info("router %s: clients on %s, workers on %s, policy %s", __version__,
                     self.clients_endpoint, self.workers_endpoint, self.config.policy)
            self.ready.set()
            announce_ready(self.config.ready_file, {
                "clients": self.clients_endpoint, "workers": self.workers_endpoint,
                "http": self.http_endpoint})
            async with asyncio.TaskGroup() as tasks:
                heartbeats = tasks.create_task(self._heartbeat_loop(), name="heartbeats")
                lag = tasks.create_task(self._watch_loop_lag(), name="loop-lag")
                await stop.wait()
                await self._drain()
                heartbeats.cancel()
                lag.cancel()
        finally:
            if self.gatekeeper is not None:
                self.gatekeeper.close()
            if http is not None:
                await http.cleanup()
            if health is not None:
                health.close()
            if self._timer is not None:
                self._timer.cancel()
            for channel in (self._clients, self._workers):
                if channel is not None:
                    channel.close()
            clients.close(linger=0)
            workers.close(linger=0)
            ctx.term()
            log.info("router stopped")

    def _check_exposure(self) -> None:
        """Secure by default: no open port beyond this machine without keys."""
        cfg = self.config
        if cfg.insecure:
            return
        if cfg.keys is None:
            for endpoint in (cfg.clients_bind, cfg.workers_bind):
                if not is_loopback(endpoint):
                    raise PichatError(
                        f"refusing to bind {endpoint} without keys: anyone on the network "
                        "could use or impersonate workers. Create keys with `pichat keygen` "
                        "(then --keys DIR, default ~/.config/pichat/keys) and copy them to "
                        "the workers, or pass --insecure on a network you trust.")
        if cfg.http and not is_loopback(cfg.http) and not cfg.api_keys:
            raise PichatError(
                f"refusing to serve HTTP on {cfg.http} without an API key: pass --api-key or "
                "--api-key-file (`pichat keygen` writes KEYS/api-keys), bind --http "
                "127.0.0.1:8080, or pass --insecure on a network you trust.")

    async def _start_http(self) -> web.AppRunner:
        from pichat.router.http import create_app

        host, _, port = self.config.http.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        from pichat.router.httpguard import GuardedSite

        cfg = self.config
        runner = web.AppRunner(
            create_app(self, api_keys=cfg.api_keys, max_body_bytes=cfg.max_message_bytes,
                       default_max_tokens=cfg.http_max_tokens,
                       body_timeout=cfg.http_body_timeout),
            access_log=None, keepalive_timeout=cfg.http_idle_timeout)
        await runner.setup()
        site = GuardedSite(runner, host, int(port), max_connections=cfg.http_max_connections,
                           backlog=1024)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self.http_site = site
        bound = site.address
        self.http_endpoint = f"http://{bound[0]}:{bound[1]}"
        log.info("HTTP on %s (OpenAI API at /v1, chat page at /, metrics at /metrics)%s",
                 self.http_endpoint, ", API keys required" if self.config.api_keys else "")
        return runner

    def _install_signals(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        def on_signal(signum: int) -> None:
            if self._accepting:
                log.info("%s: draining %d running requests (up to %.0fs); signal again to stop now",
                         signal.Signals(signum).name, len(self.jobs), self.config.drain_timeout)
                self._accepting = False
                stop.set()
            else:
                log.warning("second signal: stopping now")
                raise SystemExit(1)

        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal, signum)

    async def _drain(self) -> None:
        self._accepting = False
        deadline = time.monotonic() + self.config.drain_timeout
        while self.jobs and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for job_id in list(self.jobs):
            self._fail_client(job_id, ErrorCode.NO_WORKERS, "router shutting down")

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            for worker in list(self.workers):
                self._send_worker(worker, _HEARTBEAT)
            sinks = {job.sink.key: (job_id, job.sink) for job_id, job in self.jobs.items()}
            for job_id, sink in sinks.values():
                if not sink.keepalive():
                    self.cancel(job_id)
            now = self._now()
            self.throttle.flush(now)
            if self.gatekeeper is not None:
                self.gatekeeper.throttle.flush(now)

    async def _watch_loop_lag(self) -> None:
        """How late the loop runs a timer: what a burst of costly messages does to
        heartbeats and to every other client."""
        period = 0.1
        window: list[tuple[float, float]] = []
        loop = asyncio.get_running_loop()
        while True:
            planned = loop.time() + period
            await asyncio.sleep(period)
            now = loop.time()
            lag = max(0.0, now - planned)
            window = [(t, v) for t, v in window if now - t < 60.0]
            window.append((now, lag))
            self.loop_lag = (lag, max(v for _, v in window))
            self.metrics.loop_lag.observe(lag)

    # --- clients ----------------------------------------------------------------------

    def _on_client(self, frames: list[bytes], sender: str) -> None:
        client, body = frames[0], frames[1:]
        try:
            message = decode(body)
        except ProtocolError as exc:
            self.counts[f"rejected_{exc.code.value}"] += 1
            self.throttle.log(self._now(), logging.WARNING, "bad client message",
                              "client %s (%s): bad message: %s", client.hex(), sender, exc,
                              detail=sender)
            self._send_client(client, encode(Error(exc.request_id, exc.code, str(exc))))
            return
        if isinstance(message, Status):
            self._send_status(client)
            return
        self._version += 1
        match message:
            case Request():
                self.submit(message, _ZmqSink(self, client), owner=sender)
            case Cancel():
                self._on_cancel(client, message.id)
            case Heartbeat():
                pass
            case _:
                self.counts["rejected_bad_request"] += 1
                self._send_client(client, encode(Error(
                    "", ErrorCode.BAD_REQUEST,
                    f"{message.COMMAND.name} is not a client command")))

    def _on_dropped_client(self, frames: list[bytes], n_frames: int) -> None:
        self._version += 1
        self.counts["rejected_protocol"] += 1
        message = (f"a message of {n_frames - 1} frames was dropped unread; the protocol has "
                   "3 (tag, command, body)")
        self.throttle.log(self._now(), logging.WARNING, "too many frames", "client %s: %s",
                          frames[0].hex(), message, detail=frames[0].hex())
        self._send_client(frames[0], encode(Error("", ErrorCode.PROTOCOL, message)))

    def _on_dropped_worker(self, frames: list[bytes], n_frames: int) -> None:
        self._version += 1
        self.counts["worker_bad_messages"] += 1
        self.throttle.log(self._now(), logging.WARNING, "too many frames",
                          "worker %s: a message of %d frames was dropped unread",
                          self._name(WorkerId(frames[0])), n_frames - 1,
                          detail=self._name(WorkerId(frames[0])))

    def _send_status(self, client: bytes) -> None:
        """Every STATUS is answered, from one encoded snapshot shared by every reply
        (zero-copy: a queued reply costs a reference, not a copy). It is built again when
        something changed, or after `_STATUS_TTL`, and for a client over its rate only when
        there is none yet: a flood costs a send each, never a snapshot each."""
        now = self._now()
        cached = self._status_cache
        stale = cached is None or cached[0] != self._version or now - cached[1] > _STATUS_TTL
        if stale and (cached is None or self.status_limit.allow(client, now)):
            self.counts["status_snapshots"] += 1
            cached = self._status_cache = (self._version, now,
                                           encode(Status(self.snapshot())))
        elif stale:
            self.counts["status_throttled"] += 1
        assert cached is not None
        self.counts["status_replies"] += 1
        self._send_client(client, cached[2], copy=False)

    def submit(self, request: Request, sink: ReplySink, *, owner: str = "") -> None:
        """Accept a request of `owner`; its chunks, DONE or ERROR go to `sink`."""
        self._version += 1
        if request.id in self.jobs:
            if self.jobs[request.id].sink.key == sink.key:
                return  # the client sent it again (it thought us gone): already on it
            self._count_failure(ErrorCode.BAD_REQUEST)
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               f"request id {request.id!r} is already in use"), None)
            return
        if not self._accepting:
            sink.deliver(Error(request.id, ErrorCode.NO_WORKERS, "router shutting down"), None)
            return
        size = sum(len(m.content) for m in request.messages) + len(request.prompt or "")
        if size > self.config.max_prompt_chars:
            self.counts["rejected_prompt_too_large"] += 1
            self._count_failure(ErrorCode.BAD_REQUEST)
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               f"the conversation is {size} characters; this router accepts "
                               f"at most {self.config.max_prompt_chars}"), None)
            return
        now = self._now()
        self.counts["requests"] += 1
        prefer: WorkerId | None = None
        tag = owner_tag(owner)
        session = scoped_session(owner, request.session) if request.session else None
        if session is None and request.messages and self.config.policy == "affinity":
            match = self.prefixes.lookup(request.messages)
            if match.session is not None and match.session.startswith(f"{tag}~"):
                self.counts["prefix_continuations"] += 1
                session = match.session
            else:  # another owner's conversation is not this one's, only a shared prefix
                session = scoped_session(owner, f"auto-{request.id}")
                shared = match.shared or match.session
                if shared is not None:
                    prefer = self.scheduler.warm_worker(shared)
        request = replace(request, session=session, owner=tag, isolate=self.config.isolate_cache,
                          lease=None)
        frames = encode(request)
        if sum(map(len, frames)) > self.config.max_message_bytes - 256:
            self.counts["rejected_too_large"] += 1
            self._count_failure(ErrorCode.BAD_REQUEST)
            sink.deliver(Error(request.id, ErrorCode.BAD_REQUEST,
                               "the request is larger than a worker accepts "
                               f"(--max-message-bytes {self.config.max_message_bytes})"), None)
            return
        self.jobs[request.id] = ClientJob(sink, request, now, owner=owner)
        self._apply(self.scheduler.submit(request.id, request.session, now, model=request.model,
                                          timeout=request.timeout, prefer=prefer, owner=owner))

    def cancel(self, job_id: RequestId) -> None:
        """The submitter gave up on the request: stop it, send nothing more."""
        self._version += 1
        if self.jobs.pop(job_id, None) is not None:
            self.counts["cancelled"] += 1
            self.metrics.requests.labels("cancelled").inc()
            self._apply(self.scheduler.cancel(job_id, self._now()))

    def _on_cancel(self, client: bytes, job_id: RequestId) -> None:
        job = self.jobs.get(job_id)
        if job is None or job.sink.key != client:
            return  # finished already, or not this client's: nothing to do
        log.info("req=%s cancelled by client", job_id)
        job.sink.deliver(Error(job_id, ErrorCode.CANCELLED, "cancelled by the client"), None)
        self.cancel(job_id)

    def _send_client(self, client: bytes, frames: list[bytes], copy: bool = True) -> bool:
        try:
            self._clients.send([client, *frames], copy=copy)
            return True
        except zmq.ZMQError as exc:
            # EHOSTUNREACH: the client disconnected; EAGAIN: it stopped reading.
            gone = [jid for jid, job in self.jobs.items() if job.sink.key == client]
            if gone:
                log.info("client %s unreachable (%s): cancelling %d requests", client.hex(),
                         exc.strerror, len(gone))
            for job_id in gone:
                self.counts["client_gone"] += 1
                self.cancel(job_id)
            return False

    def _deliver(self, job_id: RequestId, message: Chunk | Done | Error,
                 frames: list[bytes] | None) -> None:
        job = self.jobs.get(job_id)
        if job is not None and not job.sink.deliver(message, frames):
            self.cancel(job_id)

    def _fail_client(self, job_id: RequestId, code: ErrorCode, message: str) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return
        self._count_failure(code)
        job.sink.deliver(Error(job_id, code, message), None)

    def _count_failure(self, code: ErrorCode) -> None:
        self.counts[f"failed_{code.value}"] += 1
        self.metrics.requests.labels(code.value).inc()

    # --- workers ----------------------------------------------------------------------

    def _on_worker(self, frames: list[bytes], sender: str) -> None:
        worker, body = WorkerId(frames[0]), frames[1:]
        now = self._now()
        self._version += 1
        try:
            message = decode(body)
        except ProtocolError as exc:
            self.counts["worker_bad_messages"] += 1
            self.throttle.log(now, logging.WARNING, "bad worker message",
                              "worker %s: bad message: %s", self._name(worker), exc,
                              detail=self._name(worker))
            if exc.code is ErrorCode.VERSION:
                self._send_worker(worker, encode(Error("", exc.code, str(exc))))
            return
        if isinstance(message, Ready):
            self._on_ready(worker, message, now,
                           sender[len("key:"):] if sender.startswith("key:") else None)
            return
        if not self.scheduler.heard_from(worker, now):
            if not isinstance(message, Disconnect):
                self._tell_to_register(worker, now)
            return
        match message:
            case Heartbeat():
                info = self.workers[worker]
                if message.draining and not info.heartbeat.draining:
                    log.info("worker %s is draining: no new requests for it", self._name(worker))
                    self.scheduler.set_draining(worker)
                info.heartbeat = message
                if message.evicted:
                    self.scheduler.forget_sessions(worker, message.evicted)
            case Chunk():
                self._on_chunk(worker, message, body, now)
            case Done():
                self._on_done(worker, message, body, now)
            case Error():
                self._on_worker_error(worker, message, body, now)
            case Disconnect():
                log.info("worker %s leaving: %s; %d warm sessions handed back",
                         self._name(worker), clip(message.reason, 80), len(message.sessions))
                self.scheduler.forget_sessions(worker, message.sessions)
                self._forget_worker(worker)
                self._apply(self.scheduler.remove_worker(worker, now, "worker left"))
            case _:
                self.throttle.log(now, logging.WARNING, "odd worker command",
                                  "worker %s sent %s; ignored", self._name(worker),
                                  message.COMMAND.name)

    def _tell_to_register(self, worker: WorkerId, now: float) -> None:
        """DISCONNECT an unknown worker, once per heartbeat interval: the messages it sent
        before it heard us must not each trigger another re-registration."""
        told = self._told_to_register.get(worker)
        if told is not None and now - told < self.config.heartbeat_interval:
            return
        if len(self._told_to_register) > 10_000:
            self._told_to_register.clear()
        self._told_to_register[worker] = now
        self._send_worker(worker, _UNKNOWN_WORKER)

    def _on_ready(self, worker: WorkerId, ready: Ready, now: float, user: str | None) -> None:
        self._told_to_register.pop(worker, None)
        old = self.workers.get(worker)
        if old is not None and old.ready.worker != ready.worker:
            self.names.release(old.ready.worker, worker)
        if user is not None and (holder := self.names.claim(ready.worker, user, worker)):
            self.counts["workers_refused_name"] += 1
            self.throttle.log(now, logging.WARNING, "name taken",
                              "refused worker %s (key %s): the name is held by key %s",
                              clip(ready.worker, 60), user, holder, detail=user)
            self._send_worker(worker, encode(Error(
                "", ErrorCode.BAD_REQUEST,
                f"the worker name {clip(ready.worker, 60)!r} is in use by another key; "
                "choose another --name")))
            return
        identity = user or ready.worker
        warm = tuple(s for s, lease in ready.warm if self.leases.valid(identity, s, lease))
        if len(warm) < len(ready.warm):
            self.counts["warm_claims_refused"] += len(ready.warm) - len(warm)
            self.throttle.log(now, logging.WARNING, "unleased claims",
                              "worker %s claimed %d warm sessions without a valid lease; "
                              "ignored", clip(ready.worker, 60), len(ready.warm) - len(warm),
                              detail=clip(ready.worker, 60))
        self.registrations[ready.worker] += 1
        if len(self.registrations) > 4 * self.config.scheduler.max_sessions:
            self.registrations.clear()  # bounded: names are free text
        log.info("worker %s ready: model %s (%s), %d slots, ctx %d, %d warm sessions",
                 clip(ready.worker, 60), clip(ready.model, 60), ready.backend, ready.slots,
                 ready.ctx, len(warm))
        actions = self.scheduler.add_worker(worker, ready.model, ready.slots, now, warm)
        if old is not None:
            # It registers afresh (it reset itself): what it ran is requeued; no DISCONNECT.
            log.info("worker %s registered again; its running requests are placed again",
                     clip(ready.worker, 60))
            actions = [a for a in actions if not isinstance(a, WorkerDead)]
        self.workers[worker] = _WorkerInfo(ready, time.time(), Heartbeat(warm=len(warm)),
                                           identity)
        self._send_worker(worker, _HEARTBEAT)  # an acknowledgement: "I know you now"
        self._apply(actions)

    def _forget_worker(self, worker: WorkerId) -> _WorkerInfo | None:
        info = self.workers.pop(worker, None)
        if info is not None:
            self.names.release(info.ready.worker, worker)
        return info

    def _owned(self, worker: WorkerId, job_id: RequestId) -> bool:
        """Results count only from the worker the request is assigned to now: anything
        else is stale (a worker we gave up on, a request already re-dispatched)."""
        if self.scheduler.owner(job_id) == worker:
            return True
        self.counts["stale_results"] += 1
        return False

    def _on_chunk(self, worker: WorkerId, chunk: Chunk, frames: list[bytes], now: float) -> None:
        if not self._owned(worker, chunk.id):
            return
        self.scheduler.chunk_seen(chunk.id, resumable=bool(chunk.tokens) or not chunk.text)
        job = self.jobs.get(chunk.id)
        if job is None:
            return  # the client is gone or was answered; the worker is being cancelled
        if job.first_chunk is None:
            job.first_chunk = now
            self.metrics.ttft.observe(now - job.arrived)
        renumbered = job.delivered(chunk)
        if renumbered is not None:  # after a failover
            chunk, frames = renumbered, encode(renumbered)
        self._deliver(chunk.id, chunk, frames)

    def _on_done(self, worker: WorkerId, done: Done, frames: list[bytes], now: float) -> None:
        if not self._owned(worker, done.id):
            return
        job = self.jobs.get(done.id)
        if job is not None:
            if (final := job.final(done)) is not None:
                done, frames = final, None
            self.counts["completed"] += 1
            self.metrics.completed(done.usage)
            request = job.request
            if request.messages and request.session and done.finish != "cancelled":
                self.prefixes.record(request.messages, "".join(job.text), request.session)
            self.counts["prompt_tokens"] += done.usage.prompt_tokens
            self.counts["cached_tokens"] += done.usage.cached_tokens
            self.counts["completion_tokens"] += done.usage.completion_tokens
            self.workers[worker].served += 1
            log.info("req=%s session=%s worker=%s done: %s, prompt %d (cached %d), "
                     "%d tokens, %.0f ms",
                     done.id, job.request.session, done.worker, done.finish,
                     done.usage.prompt_tokens, done.usage.cached_tokens,
                     done.usage.completion_tokens, (now - job.arrived) * 1000)
            self._deliver(done.id, done, frames)
            self.jobs.pop(done.id, None)
        self._apply(self.scheduler.finished(done.id, now))

    def _on_worker_error(self, worker: WorkerId, error: Error, frames: list[bytes],
                         now: float) -> None:
        if not error.id:
            self.throttle.log(now, logging.WARNING, "worker error",
                              "worker %s reports: %s: %s", self._name(worker), error.code,
                              clip(error.message, 200), detail=self._name(worker))
            return
        if not self._owned(worker, RequestId(error.id)):
            return
        if error.code is ErrorCode.BUSY and RequestId(error.id) in self.jobs:
            # Refused before it started (draining, or full): place it again.
            log.info("req=%s refused by worker %s (%s); placing it again", error.id,
                     self._name(worker), clip(error.message, 80))
            self._apply(self.scheduler.bounce(RequestId(error.id), now))
            return
        job = self.jobs.pop(RequestId(error.id), None)
        if job is not None:
            self._count_failure(error.code)
            log.info("req=%s worker=%s error %s: %s", error.id, self._name(worker),
                     error.code, clip(error.message, 200))
            job.sink.deliver(error, frames)
        self._apply(self.scheduler.finished(RequestId(error.id), now))

    def _send_worker(self, worker: WorkerId, frames: list[bytes]) -> bool:
        try:
            self._workers.send([worker, *frames])
            return True
        except zmq.ZMQError as exc:
            # The connection is gone (EHOSTUNREACH) or stuck (EAGAIN): dead, as if silent.
            self._apply(self.scheduler.remove_worker(
                worker, self._now(), f"unreachable ({exc.strerror})"))
            return False

    # --- actions and time -------------------------------------------------------------

    def _apply(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Dispatch(job=job_id, worker=worker):
                    job = self.jobs.get(job_id)
                    if job is None:  # answered meanwhile: never sent, so free the slot
                        self._apply(self.scheduler.finished(job_id, self._now()))
                        continue
                    if action.failover:
                        job.continue_elsewhere()
                        self.counts["failovers"] += 1
                        log.warning("req=%s failover: continuing on worker %s after %d tokens "
                                    "(%d chunks)", job_id, self._name(worker), job.resumed,
                                    job.chunks)
                    how = ("failover" if action.failover else "retry" if action.retry else
                           "affinity" if action.affinity_hit else "prefix" if action.prefix_hit
                           else "spill" if action.spilled else "load")
                    self.counts["affinity_hits"] += action.affinity_hit
                    self.counts["prefix_hits"] += action.prefix_hit
                    self.counts["spills"] += action.spilled
                    self.counts["retries"] += action.retry
                    self.metrics.placements.labels(how).inc()
                    log.debug("req=%s session=%s -> worker=%s%s", job_id, job.request.session,
                              self._name(worker), " (affinity)" if action.affinity_hit else "")
                    self._send_worker(worker, self._request_frames(job, worker))
                case Fail(job=job_id, code=code, message=message):
                    self._fail_client(job_id, code, message)
                case CancelOnWorker(job=job_id, worker=worker):
                    self._send_worker(worker, encode(Cancel(job_id)))
                case WorkerDead(worker=worker, reason=reason):
                    info = self._forget_worker(worker)
                    if info is not None:
                        self.counts["workers_lost"] += 1
                        log.warning("worker %s lost: %s", info.ready.worker, reason)
                        # If it is only slow (stopped, partitioned) it must re-register.
                        self._tell_to_register(worker, self._now())
        self._arm_timer()

    def _request_frames(self, job: ClientJob, worker: WorkerId) -> list[bytes]:
        """The REQUEST for `worker`, with its lease on the session."""
        request = job.outgoing or job.request
        info = self.workers.get(worker)
        if request.session is not None and info is not None:
            request = replace(request, lease=self.leases.sign(info.identity, request.session))
        return encode(request)

    def _tick(self) -> None:
        self._timer = None
        self._version += 1
        if self._workers is not None:
            # Read what the workers sent before judging them silent: a burst of costly
            # client messages may have kept the loop from their heartbeats.
            self._workers.drain_now()
        self._apply(self.scheduler.tick(self._now()))

    def _arm_timer(self) -> None:
        loop = self._loop
        if loop is None:
            return
        wake = self.scheduler.next_wakeup(self._now())
        if wake is None:
            return
        if self._timer is not None:
            if self._timer.when() <= wake:
                return
            self._timer.cancel()
        self._timer = loop.call_at(wake, self._tick)

    def _now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def _name(self, worker: WorkerId) -> str:
        info = self.workers.get(worker)
        return info.ready.worker if info else worker.hex()

    # --- status -----------------------------------------------------------------------

    def _health(self) -> dict[str, Any]:
        return {"role": "router", "healthy": self._accepting,
                "workers": len(self.workers), "active": len(self.jobs),
                "queue": self.scheduler.queue_depth}

    def snapshot(self) -> dict[str, Any]:
        """The cluster as `pichat status --json` shows it."""
        now = self._now()
        sched = self.scheduler
        workers = []
        for wid, info in self.workers.items():
            view = sched.workers.get(wid)
            workers.append({
                "name": info.ready.worker,
                "id": wid.hex(),
                "model": info.ready.model,
                "backend": info.ready.backend,
                "version": info.ready.version,
                "ctx": info.ready.ctx,
                "slots": info.ready.slots,
                "busy": view.busy if view else 0,
                "streaming": sum(sched.jobs[j].streamed for j in view.jobs if j in sched.jobs)
                if view else 0,
                "warm_sessions": info.heartbeat.warm,
                "tokens_per_s": round(info.heartbeat.tps, 1),
                "served": info.served,
                "restarts": max(0, self.registrations[info.ready.worker] - 1),
                "draining": info.heartbeat.draining,
                "last_seen_s": round(now - view.last_seen, 2) if view else None,
                "up_s": round(time.time() - info.joined, 1),
            })
        prompt, cached = self.counts["prompt_tokens"], self.counts["cached_tokens"]
        return {
            "router": {
                "version": __version__,
                "policy": self.config.policy,
                "clients": self.clients_endpoint,
                "http": self.http_endpoint,
                "workers": self.workers_endpoint,
                "up_s": round(time.time() - self.started, 1),
                "memory": {"rss_mb": self.metrics.resident_mb(),
                           "python_blocks": sys.getallocatedblocks()},
                "loop_lag_ms": {"now": round(self.loop_lag[0] * 1000, 1),
                                "max_1m": round(self.loop_lag[1] * 1000, 1)},
            },
            "queue": {"depth": sched.queue_depth, "limit": self.config.scheduler.queue_limit},
            "security": {
                "curve": self.config.keys is not None,
                "api_keys": bool(self.config.api_keys),
                "refused": dict(self.gatekeeper.refused) if self.gatekeeper else {},
                "isolate_cache": self.config.isolate_cache,
                "log_lines_suppressed": self.throttle.suppressed + (
                    self.gatekeeper.throttle.suppressed if self.gatekeeper else 0),
                "frames_dropped": sum(c.dropped for c in (self._clients, self._workers) if c),
                "http_connections_refused": self.http_site.refused if self.http_site else 0,
            },
            "requests": {
                "active": len(self.jobs),
                **{k: v for k, v in sorted(self.counts.items())},
                "cache_hit_share": round(cached / prompt, 4) if prompt else 0.0,
                "sessions_remembered": len(sched.affinity),
                "sessions_forgotten": sched.sessions_forgotten,
                "pushed_out": sched.pushed_out,
                "cancels_ignored": sched.cancels_ignored,
                "prefixes_remembered": len(self.prefixes),
                "prefixes_forgotten": self.prefixes.dropped,
            },
            "workers": sorted(workers, key=lambda w: w["name"]),
        }
