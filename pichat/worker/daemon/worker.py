"""The worker daemon: a DEALER socket to each router, heartbeats, and one thread per slot.

Lifecycle (`Phase`, changed only by `_enter`): SERVING (it takes requests); DRAINING
(SIGTERM: nothing new, what runs finishes, then it leaves); STOPPING. Each router it is
given has a `Registration` of its own (pichat/worker/daemon/registration.py), which ends
when that router falls silent for `liveness` heartbeats or asks it to register again with
DISCONNECT: whatever it was generating for that router belongs to a router that has given
up on it, so it is cancelled (its epoch bumped: nothing more of it is sent), then READY is
sent again, with the sessions still warm here so a restarted router relearns affinity.
A request sent again by another router (its client moved there) goes on there, its
chunks so far sent again; so does an answer whose client asks another router for the rest
(a continuation of the same question by the same owner, after whole chunks of it): it is
not read again, and the chunks made meanwhile follow at once. Reconnecting after silence
uses capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from enum import Enum

import zmq

from pichat import __version__
from pichat.config import DEFAULT_WORKER_ENDPOINT, WorkerConfig
from pichat.daemon import on_stop_signals
from pichat.errors import ErrorCode, PichatError, ProtocolError
from pichat.health import HealthEndpoint
from pichat.link import Link
from pichat.logs import clip
from pichat.protocol import (
    MAX_WARMED,
    Cancel,
    Chunk,
    Disconnect,
    Done,
    Error,
    Heartbeat,
    Message,
    Migrate,
    Ready,
    Request,
    RequestId,
    SessionId,
    State,
    StateAck,
    Usage,
    decode,
    encode,
)
from pichat.router.policy.prefix import state
from pichat.worker.daemon import sizing
from pichat.worker.daemon.migration import StateMover
from pichat.worker.daemon.registration import Registration
from pichat.worker.engine.backend import Generation, Model, SavedState
from pichat.worker.engine.textstream import TextStream
from pichat.worker.store.disk import DiskStore
from pichat.worker.store.slots import Slot, SlotManager

__all__ = ["Worker", "Phase"]

log = logging.getLogger(__name__)

_BACKOFF_START = 0.25


def _moving_average(old: float, new: float) -> float:
    return 0.7 * old + 0.3 * new if old else new


class Phase(Enum):
    SERVING = "serving"
    DRAINING = "draining"
    STOPPING = "stopping"


@dataclass(slots=True)
class _Running:
    """A request this worker is generating."""

    request: Request
    slot: Slot
    reg: Registration
    """The router it answers to."""
    epoch: int
    """`reg`'s epoch when it came: its messages are sent while that epoch lasts."""
    cancelled: threading.Event
    id: RequestId = RequestId("")
    """The request its messages answer: `request`'s, or the continuation that took it on."""
    task: asyncio.Task | None = None
    sent: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    """Its chunks so far (text, token ids), for a router it moves to."""
    base: int = 0
    """How many of `sent` came before `id`'s first chunk."""
    ahead: int = 0
    """Tokens of the answer `id` was given as its continuation (counted as its prompt)."""
    successor: Request | None = None
    """The continuation that took it over (its session is the one the slot holds then)."""

    def __post_init__(self) -> None:
        self.id = self.id or self.request.id


_WAIT_PATIENCE = 60.0
"""Seconds a router refused for want of a slot counts as waiting for one (if no slot kept
for it went untaken meanwhile)."""


def _answer_of(request: Request) -> Request:
    """What decides a request's answer: not its id, its session (a router names a client's
    unnamed one after the request), its deadline, its lease, its token budget or the tokens
    it continues."""
    return replace(request, id=RequestId(""), session=None, continuation=(), timeout=None,
                   lease=None, attempt=0, sampling=replace(request.sampling, max_tokens=0))


def _resumes(job: _Running, want: tuple[int, ...]) -> int | None:
    """How many of `job`'s chunks the answer tokens `want` are (None: they are not a run
    of its whole chunks)."""
    have = job.request.continuation
    if want[:len(have)] != have:
        return None
    at = len(have)
    for k, (_, tokens) in enumerate(job.sent):
        if at == len(want):
            return k
        if not tokens or want[at:at + len(tokens)] != tokens:
            return None
        at += len(tokens)
    return len(job.sent) if at == len(want) else None


class Worker:
    """`await Worker(config, model).run()` serves until cancelled or signalled."""

    def __init__(self, config: WorkerConfig, model: Model) -> None:
        self.config = config
        self.model = model
        disk = (DiskStore(config.state_dir, config.disk_cache_mb << 20, model.format)
                if config.state_dir else None)
        self.slots = SlotManager(model, config.slots, config.threads, config.cache_mb << 20,
                                 disk, shift=config.context_shift, block=config.slide_block,
                                 memory=config.memory, embedding_only=config.embedding)
        self.jobs: dict[RequestId, _Running] = {}
        self._held: tuple[Registration, float] | None = None
        """A freed slot kept, until then, for a router refused for want of one."""
        self.registrations = [Registration(endpoint) for endpoint in config.routers]
        self._transfers: Registration | None = None
        """The router that relays this worker's KV state transfers (the last to ask)."""
        self.mover = StateMover(send=self._send_transfer, export=self._export_state,
                                accept=self.slots.accept, state_format=model.format,
                                budget=self.slots.store.budget, max_tokens=model.n_ctx,
                                token_bytes=model.kv_token_bytes)
        self._moves: set[asyncio.Task] = set()
        self._move_activity = asyncio.Event()
        """Set when a transfer starts or ends (a draining worker waits for them)."""
        self.prompt_tps = 0.0
        """Recent prompt reading speed, tokens per second (the router's cost model)."""
        self.phase = Phase.SERVING
        self.tps = 0.0
        self._executors = [ThreadPoolExecutor(1, thread_name_prefix=f"slot{i}")
                           for i in range(config.slots)]
        self._ctx: zmq.Context | None = None
        self._health: HealthEndpoint | None = None
        self._idle = asyncio.Event()
        """Set whenever nothing is running (what a drain waits for)."""
        self._idle.set()
        self._drain_task: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        """The one place the phase changes. STOPPING ends every registration (bumps its
        epoch), so nothing more of what ran under it is sent."""
        now = self.phase
        if now is Phase.STOPPING or phase is now:
            return
        if phase is Phase.STOPPING:
            for reg in self.registrations:
                reg.epoch += 1
                reg.wake.set()
        self.phase = phase

    @property
    def accepting(self) -> bool:
        return self.phase is Phase.SERVING

    def stop(self) -> None:
        """Ask `run` to return (from the event loop's thread)."""
        self._enter(Phase.STOPPING)

    def drain(self) -> None:
        """Stop taking new work, finish what is running (up to the drain timeout), then
        leave, handing the warm sessions back to the router."""
        if self._drain_task is not None:
            return
        self._enter(Phase.DRAINING)
        log.info("draining %d running requests (up to %.0fs); signal again to exit at once",
                 len(self.jobs), self.config.drain_timeout)
        self._send_heartbeat()  # the router stops sending us work now
        self._drain_task = asyncio.get_running_loop().create_task(self._finish_then_stop(),
                                                                    name="drain")

    async def _finish_then_stop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.drain_timeout
        try:
            await asyncio.wait_for(self._idle.wait(), self.config.drain_timeout)
        except TimeoutError:
            log.warning("drain timeout: %d requests still running move to other workers",
                        len(self.jobs))
        else:
            await self._hand_over(deadline)
        self.stop()

    async def _hand_over(self, deadline: float) -> None:
        """While the router moves this worker's warm conversations to others (MIGRATE, one
        after another), stay: until no transfer has run for two heartbeats, or the drain
        timeout."""
        if not self.slots.warm_sessions():
            return
        loop = asyncio.get_running_loop()
        quiet = 2 * self.config.heartbeat_interval
        while (remaining := deadline - loop.time()) > 0:
            self._move_activity.clear()
            try:
                await asyncio.wait_for(self._move_activity.wait(), min(quiet, remaining))
            except TimeoutError:
                if not self._moves:
                    break
        if self.mover.sent:
            log.info("handed %d warm conversations over before leaving", self.mover.sent)

    async def run(self, *, handle_signals: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._ctx = zmq.Context()
        if self.config.health_bind:
            self._health = HealthEndpoint(self._ctx, self.config.health_bind, self.health, loop)
        if handle_signals:
            on_stop_signals(loop, lambda _name: self.drain())
        log.info("%s", self.sizing())
        if warning := self.memory_warning():
            log.warning("%s", warning)
        serving = [asyncio.create_task(self._serve(reg), name=f"router-{i}")
                   for i, reg in enumerate(self.registrations)]
        try:
            await asyncio.gather(*serving)
        finally:
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
            await self._shutdown()

    async def _serve(self, reg: Registration) -> None:
        """Stay registered with one router until the worker stops."""
        backoff = _BACKOFF_START
        alone = len(self.registrations) == 1
        heard = not alone or reg.endpoint != DEFAULT_WORKER_ENDPOINT  # none set: look first
        while self.phase is not Phase.STOPPING:
            if not heard:
                await self._discover(reg)
            heard = await self._connection(reg)
            if self.phase is Phase.STOPPING:
                break
            backoff = _BACKOFF_START if heard else min(backoff * 2, self.config.reconnect_max)
            delay = backoff * random.uniform(0.8, 1.2)
            log.info("reconnecting to %s in %.1fs", reg.endpoint, delay)
            await reg.sleep(delay)

    async def _discover(self, reg: Registration) -> None:
        """No router address, or the one we have stopped answering: with the router's
        public key (a joined Pi) and discovery on, look for it on the LAN
        (pichat/discovery.py); an announcement with another key is ignored."""
        cfg = self.config
        if not cfg.discovery or cfg.keys is None:
            return
        if cfg.keys.on_routers_host():
            return
        try:
            key = cfg.keys.router_public().decode()
        except PichatError:
            return
        from pichat.discovery import relocate

        others = frozenset(r.endpoint for r in self.registrations if r is not reg)
        found = await relocate(cfg.keys.directory, key, "workers", reg.endpoint, keys=cfg.keys,
                               key_name=cfg.key_name, avoid=others)
        if found and found != reg.endpoint:
            reg.endpoint = found
            self.config = replace(cfg, router=found)

    async def _export_state(self, session: str) -> SavedState | None:
        """Session's KV state for another worker: from its slot (saved on the slot's own
        thread, the slot held meanwhile), else the session store or the disk."""
        loop = asyncio.get_running_loop()
        slot = self.slots.acquire_resident(SessionId(session))
        if slot is not None:
            try:
                return await loop.run_in_executor(self._executors[slot.index],
                                                  self.slots.save_slot, slot)
            finally:
                self.slots.release(slot)
        return await asyncio.to_thread(self.slots.stored_state, SessionId(session))

    def _move_ended(self, task: asyncio.Task) -> None:
        self._moves.discard(task)
        self._move_activity.set()

    @property
    def kv_cache_bytes(self) -> int:
        """The RAM the slots' KV cache reserves."""
        return sizing.kv_cache_bytes(self.config.slots, self.model)

    def sizing(self) -> str:
        """Where this worker's RAM for conversations goes, in one line."""
        return sizing.describe(self.config.slots, self.model, self.slots.store.budget)

    def memory_warning(self, total: int | None = None) -> str | None:
        """A warning if this worker needs more RAM than the machine has (`total`: bytes,
        else read from the system); see pichat/worker/daemon/sizing.py."""
        return sizing.memory_warning(self.config.slots, self.model, self.slots.store.budget,
                                     total if total is not None else sizing.total_memory())

    async def _shutdown(self) -> None:
        self._enter(Phase.STOPPING)
        goodbye = encode(Disconnect("worker shutting down",
                                    sessions=tuple(self.slots.warm_sessions())))
        for reg in self.registrations:
            reg.send(goodbye)
        await self._cancel_all()
        for reg in self.registrations:
            reg.close(linger_ms=500)  # let the DISCONNECT out
        if self._health is not None:
            self._health.close()
        for executor in self._executors:
            executor.shutdown(wait=True)
        if self.slots.disk is not None:
            await asyncio.to_thread(self.slots.disk.close)  # what is queued is written
        self.model.close()
        if self._ctx is not None:
            self._ctx.term()
        log.info("worker %s stopped", self.config.name)

    async def _connection(self, reg: Registration) -> bool:
        """One connection to a router. Returns whether the router ever answered."""
        loop = asyncio.get_running_loop()
        cfg = self.config
        reg.link = Link(self._ctx, reg.endpoint, keys=cfg.keys, key_name=cfg.key_name,
                        max_message_bytes=cfg.max_message_bytes, loop=loop,
                        on_message=lambda frames: self._on_message(reg, frames),
                        on_refused=lambda reason: self._on_refused(reg, reason))
        reg.register_again.clear()  # this connection's READY supersedes any earlier ask
        self._send_ready(reg)
        reg.connected_at = reg.last_heard = loop.time()
        silence_limit = cfg.heartbeat_interval * cfg.liveness
        try:
            while self.phase is not Phase.STOPPING:
                await reg.sleep(cfg.heartbeat_interval)
                if self.phase is Phase.STOPPING:
                    break
                if reg.register_again.is_set():
                    # The router does not know us (it restarted, or gave us up for dead).
                    reg.register_again.clear()
                    await self._reset(reg)
                    self._send_ready(reg)
                    continue
                silent = loop.time() - reg.last_heard
                if silent > silence_limit:
                    if not reg.heard:
                        await self._unanswered(reg, silent)
                    else:
                        log.warning("router %s silent for %.1fs", reg.endpoint, silent)
                    break
                self.mover.expire()
                self._send_heartbeat(reg)
        finally:
            if self.phase is not Phase.STOPPING:  # on stop, _shutdown says goodbye here
                await self._reset(reg)
                reg.close()
        return reg.heard

    async def _unanswered(self, reg: Registration, silent: float) -> None:
        """Say why a READY may have gone unanswered (else nothing in either log would)."""
        from pichat.discovery import answers

        router = reg.endpoint
        if await asyncio.to_thread(answers, router):
            why = ("something accepts connections there, but no pichat router answers "
                   "workers on it (another port, or another program?)")
        else:
            why = ("nothing accepts connections there: the router is down, or listens "
                   "elsewhere (its --workers-bind; a router bound to 127.0.0.1 serves only "
                   "its own host)")
        log.warning("the router at %s never answered this worker's READY (%.0fs): %s",
                    router, silent, why)

    def _on_refused(self, reg: Registration, reason: str) -> None:
        log.error("%s: the router at %s does not accept this worker's key; add %s/%s.key to "
                  "the router's workers/ directory", reason, reg.endpoint,
                  self.config.keys.directory if self.config.keys else "KEYS",
                  self.config.key_name)

    async def _reset(self, reg: Registration) -> None:
        """End a registration: stop every generation it sent and wait for it, since nobody
        waits for their results. Its requests that arrive meanwhile are refused (the
        router places them again), so its slots are free, and the router's view right,
        when READY goes out next."""
        reg.resetting = True
        reg.epoch += 1
        try:
            await self._cancel_all(reg)
        finally:
            reg.resetting = False

    async def _cancel_all(self, reg: Registration | None = None) -> None:
        """Cancel the work of `reg` (None: of every registration) and wait for it."""
        if reg is None or reg is self._transfers:
            moves = list(self._moves)  # state transfers through that router end with it
            for task in moves:
                task.cancel()
            await asyncio.gather(*moves, return_exceptions=True)
        while jobs := [j for j in self.jobs.values() if reg is None or j.reg is reg]:
            for job in jobs:
                job.cancelled.set()
            await asyncio.gather(*(j.task for j in jobs if j.task is not None),
                                 return_exceptions=True)
            for job in jobs:  # each task removes its own job; make sure
                if self.jobs.get(job.id) is job:
                    del self.jobs[job.id]
        if not self.jobs:
            self._idle.set()

    def health(self) -> dict:
        """This worker as `pichat health` shows it: healthy while it hears a router."""
        now = asyncio.get_running_loop().time()
        limit = self.config.heartbeat_interval * self.config.liveness
        routers = [{"router": reg.endpoint,
                    "connected": (reg.heard and self.phase is not Phase.STOPPING
                                  and now - reg.last_heard <= limit),
                    "last_heard_s": round(now - reg.last_heard, 2) if reg.heard else None}
                   for reg in self.registrations]
        first = next((r for r in routers if r["connected"]), routers[0])
        return {
            "role": "worker", "healthy": first["connected"], "name": self.config.name,
            "model": self.model.name, "backend": self.model.backend,
            **first, "routers": routers,
            "slots": self.config.slots, "busy": self.slots.busy, "phase": self.phase.value,
        }

    # --- messages ---------------------------------------------------------------------

    def _on_message(self, reg: Registration, frames: list[bytes]) -> None:
        try:
            message = decode(frames)
        except ProtocolError as exc:
            log.warning("bad message from the router: %s", exc)
            if exc.request_id:
                reg.send(encode(Error(exc.request_id, exc.code, str(exc))))
            return
        reg.last_heard = asyncio.get_running_loop().time()
        self._handle(reg, message)

    def _handle(self, reg: Registration, message: Message) -> None:
        match message:
            case Request():
                self._on_request(reg, message)
            case Cancel():
                job = self.jobs.get(message.id)
                if job is not None and job.reg is reg:  # only its own router cancels it
                    log.info("req=%s cancel", message.id)
                    job.cancelled.set()
            case Heartbeat():
                pass
            case Migrate():
                self._transfers = reg
                task = asyncio.create_task(self.mover.send_state(message))
                self._moves.add(task)
                self._move_activity.set()
                task.add_done_callback(self._move_ended)
            case State():
                self._transfers = reg
                self.mover.on_state(message)
            case StateAck():
                self.mover.on_ack(message)
            case Disconnect():
                log.info("router %s says: %s", reg.endpoint, clip(message.reason, 200))
                reg.resetting = True  # from now on, nothing of its old jobs is sent
                reg.epoch += 1
                reg.register_again.set()
                reg.wake.set()
            case Error():
                log.error("router error: %s: %s", message.code, clip(message.message, 300))
            case _:
                log.warning("unexpected %s from the router; ignored", message.COMMAND.name)

    def _on_request(self, reg: Registration, request: Request) -> None:
        if not self.accepting or reg.resetting:
            phase = "resetting" if self.accepting else self.phase.value
            reg.send(encode(Error(request.id, ErrorCode.BUSY, f"worker {phase}")))
            return
        running = self.jobs.get(request.id)
        if running is not None:
            if running.reg is reg:
                # The router sent it again: a copy crossed our READY on the wire (the
                # router requeued what it had sent to our previous registration). It is
                # the same request and it is running: its results count.
                log.debug("req=%s already running here; duplicate ignored", request.id)
            elif request.attempt > running.request.attempt:
                self._move_job(running, reg, request)
            else:  # its router was cut off and re-placed what it held: the client is not there
                log.info("req=%s came again through %s, not sent again by its client: "
                         "refused (it goes on through %s)", request.id, reg.endpoint,
                         running.reg.endpoint)
                reg.send(encode(Error(request.id, ErrorCode.CANCELLED,
                                      "its client asked another router for it")))
            return
        if request.continuation and self._take_over(reg, request):
            return
        slot = None if self._held_for_another(reg) else self.slots.acquire(request.session)
        if slot is None:
            now = asyncio.get_running_loop().time()
            if reg.waiting is None:
                reg.waiting = now
            reg.refused = now
            reg.send(encode(Error(request.id, ErrorCode.BUSY,
                                  f"all {self.config.slots} slots are busy")))
            return
        reg.waiting = None
        if self._held is not None and self._held[0] is reg:
            self._held = None
        job = _Running(request, slot, reg, reg.epoch, threading.Event())
        self._announce(reg, request)
        self.jobs[request.id] = job
        self._idle.clear()
        job.task = asyncio.create_task(self._run(job), name=f"req-{request.id}")

    async def _run(self, job: _Running) -> None:
        """Generate `job.request`'s answer; its messages carry `job.id` (which a
        continuation taking it over changes)."""
        loop = asyncio.get_running_loop()
        request = job.request
        out = TextStream(
            lambda text, tokens: loop.call_soon_threadsafe(self._send_chunk, job, text, tokens),
            stop=request.sampling.stop,
            flush_tokens=self.config.chunk_tokens,
            flush_interval=self.config.chunk_interval,
        )
        log.debug("req=%s session=%s slot=%d start", request.id, request.session, job.slot.index)
        try:
            result: Generation = await loop.run_in_executor(
                self._executors[job.slot.index], self.slots.run, job.slot, request, out,
                job.cancelled)
        except PichatError as exc:
            log.info("req=%s failed: %s", job.id, exc)
            self._send_for(job, encode(Error(job.id, exc.code, str(exc))))
        except Exception as exc:
            log.exception("req=%s: backend failure", job.id)
            self._send_for(job, encode(Error(job.id, ErrorCode.INTERNAL,
                                             f"backend failure: {exc}")))
        else:
            usage = Usage(result.prompt_tokens, result.cached_tokens, result.completion_tokens,
                          round(result.prompt_ms, 2), round(result.generate_ms, 2),
                          result.dropped_tokens)
            if rate := usage.tokens_per_s:  # for `status`
                self.tps = _moving_average(self.tps, rate)
            read = usage.prompt_tokens - usage.cached_tokens
            if read >= 16 and usage.prompt_ms > 0:  # for the router's cost of a move
                self.prompt_tps = _moving_average(self.prompt_tps,
                                                  read / usage.prompt_ms * 1000)
            log.info("req=%s session=%s slot=%d %s: prompt %d (cached %d), %d tokens",
                     job.id, request.session, job.slot.index, result.finish,
                     usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
            if job.ahead:  # as the continuation it answers counts: what came before is prompt
                usage = replace(usage, prompt_tokens=usage.prompt_tokens + job.ahead,
                                cached_tokens=usage.cached_tokens + job.ahead,
                                completion_tokens=usage.completion_tokens - job.ahead)
            # Chunks were queued with call_soon_threadsafe before the thread returned, so
            # they are sent before this DONE.
            note = result.note
            self._tell_answered(job, result.finish)
            self._send_for(job, encode(Done(job.id, self.config.name, result.finish, usage,
                                            memory=note.text if note else None,
                                            remembered=note.covers if note else 0,
                                            embeddings=result.embeddings,
                                            tools_left_out=result.tools_left_out)))
        finally:
            if job.successor is not None:
                self.slots.rename(job.slot, job.successor.session, job.successor.lease)
            self.slots.release(job.slot)
            if self.jobs.get(job.id) is job:
                del self.jobs[job.id]
            if not self.jobs:
                self._idle.set()
            self._hold_for_waiting(job.reg)

    def _hold_for_waiting(self, ended: Registration) -> None:
        """A slot freed as `ended`'s answer ended. `ended` learns it by its DONE and would
        take it again at once, every time, before any other router hears of it: a router
        whose requests were refused for want of a slot (the one refused longest ago) is
        told now, and the slot is kept for it for a heartbeat's time (`_held_for_another`).
        Routers sharing busy workers so take turns."""
        if self._holder() is not None:
            return
        now = asyncio.get_running_loop().time()
        waiting = [r for r in self.registrations if r is not ended and r.open
                   and r.waiting is not None and now - r.refused < _WAIT_PATIENCE]
        if waiting:
            reg = min(waiting, key=lambda r: r.waiting or 0.0)
            self._held = (reg, now + self.config.heartbeat_interval)
            self._send_heartbeat(reg)

    def _holder(self) -> Registration | None:
        """The router a freed slot is kept for now (None: none, or its time is up)."""
        if self._held is None:
            return None
        holder, until = self._held
        if until <= asyncio.get_running_loop().time() or not holder.open:
            self._held = None
            holder.waiting = None  # told of a free slot, it did not take it: not waiting
            return None
        return holder

    def _held_for_another(self, reg: Registration) -> bool:
        """Is the last free slot kept for another router (`_hold_for_waiting`)?"""
        holder = self._holder()
        return (holder is not None and holder is not reg
                and self.slots.busy >= self.config.slots - 1)

    def _move_job(self, job: _Running, reg: Registration, request: Request) -> None:
        """The same request came again by another router (its client moved there when the
        first fell silent): its answer goes on there, from its first chunk; the first
        router hears that it ended."""
        job.request = replace(job.request, attempt=request.attempt)
        log.info("req=%s came again through %s: its answer goes on there (%d chunks so far)",
                 job.id, reg.endpoint, len(job.sent) - job.base)
        self._hand(job, reg, job.id, job.base)

    def _take_over(self, reg: Registration, request: Request) -> bool:
        """A continuation that another router's request, still running here, can answer:
        the same request (its client moved to this router when the first fell silent),
        whose answer so far is the continuation's tokens. That answer goes on as the
        continuation's, its prompt not read again, its tokens after the continuation's
        sent at once. Returns whether one did, or refused it: not a later try of its
        client than that request (its router, cut off and back, continuing what it held:
        the answer goes on through the router the client is with)."""
        same = _answer_of(request)
        for job in self.jobs.values():
            if job.reg is reg or job.request.owner != request.owner:
                continue
            k = _resumes(job, request.continuation)
            if k is None or _answer_of(job.request) != same:
                continue
            if request.attempt <= job.request.attempt:
                log.info("req=%s continues req=%s, not sent again by its client: refused "
                         "(it goes on through %s)", request.id, job.id, job.reg.endpoint)
                reg.send(encode(Error(request.id, ErrorCode.CANCELLED,
                                      "its client asked another router for it")))
                return True
            log.info("req=%s goes on as req=%s through %s (%d chunks follow at once)",
                     job.id, request.id, reg.endpoint, len(job.sent) - k)
            del self.jobs[job.id]
            self.jobs[request.id] = job
            job.request = replace(job.request, attempt=request.attempt)
            job.ahead = len(request.continuation) - len(job.request.continuation)
            job.successor = request
            self._announce(reg, request)
            self._hand(job, reg, request.id, k)
            return True
        return False

    def _hand(self, job: _Running, reg: Registration, answers: RequestId, base: int) -> None:
        """`job` answers `answers` through `reg` from now on, from its chunk `base`; the
        router it answered before hears that it ended there."""
        old = job.reg
        if job.epoch == old.epoch:
            old.send(encode(Error(job.id, ErrorCode.CANCELLED,
                                  "the client asked another router for it")))
        job.reg, job.epoch, job.id, job.base = reg, reg.epoch, answers, base
        for seq, (text, tokens) in enumerate(job.sent[base:]):
            reg.send(encode(Chunk(answers, seq, text, tokens)))

    def _send_chunk(self, job: _Running, text: str, tokens: tuple[int, ...]) -> None:
        job.sent.append((text, tokens))
        seq = len(job.sent) - 1 - job.base
        self._send_for(job, encode(Chunk(job.id, seq, text, tokens)))

    def _send_for(self, job: _Running, frames: list[bytes]) -> None:
        if job.epoch == job.reg.epoch:
            job.reg.send(frames)

    def _send_transfer(self, frames: list[bytes]) -> None:
        if self._transfers is not None:
            self._transfers.send(frames)

    def _send_ready(self, reg: Registration) -> None:
        model = self.model
        reg.send(encode(Ready(
            worker=self.config.name,
            model=model.name,
            backend=model.backend,
            slots=self.config.slots,
            ctx=model.n_ctx,
            version=__version__,
            warm=tuple(self.slots.warm_leases()),
            engine=model.engine,
            kv_type=model.kv_type,
            kv_cells=self.config.slots * model.n_ctx,
            kv_token_bytes=model.kv_token_bytes,
            cache_bytes=self.slots.store.budget,
            state_format=model.format,
            embedding_only=self.config.embedding,
            weights_bytes=model.weights_bytes,
            family=model.family,
            parameter_size=model.parameter_size,
            quantization=model.quantization,
        )))
        self._take_evicted()
        reg.evicted.clear()  # the READY's session list supersedes them
        reg.warmed.clear()
        reg.answered.clear()
        log.info("worker %s: READY sent to %s (%s, %d slots)", self.config.name,
                 reg.endpoint, model.name, self.config.slots)

    def _announce(self, through: Registration, request: Request) -> None:
        """A turn of `request`'s session begins here for the router of `through`: the
        other routers hear it at once, in a heartbeat (so that its next turn comes here
        whichever router it goes through)."""
        if request.session is None or request.lease is None:
            return
        for reg in self.registrations:
            if reg is through or not reg.heard:
                continue
            reg.warmed.pop(request.session, None)
            reg.warmed[request.session] = request.lease
            if len(reg.warmed) > MAX_WARMED:
                del reg.warmed[next(iter(reg.warmed))]
            if request.session in reg.evicted:
                reg.evicted.remove(request.session)
            self._send_heartbeat(reg)

    def _tell_answered(self, job: _Running, finish: str) -> None:
        """The other routers hear the state `job`'s answer left its conversation in, so a
        client that keeps no session id finds it through any of them (its next turn comes
        here). At once, in a heartbeat sent before the DONE: a client that sends its next
        turn through another router the moment this answer ends (as after a failover)
        would otherwise race the next periodic heartbeat, and lose, half the time."""
        request = job.successor or job.request
        others = [r for r in self.registrations if r is not job.reg and r.heard]
        if (not others or not request.messages or request.session is None
                or job.request.continuation or finish == "cancelled"):
            return
        answer = "".join(text for text, _ in job.sent)
        reached = state(job.request.messages, answer, job.request.tools).hex()
        for reg in others:
            reg.answered.pop(request.session, None)
            reg.answered[request.session] = reached
            if len(reg.answered) > MAX_WARMED:
                del reg.answered[next(iter(reg.answered))]
            self._send_heartbeat(reg)

    def _take_evicted(self) -> None:
        """Hand the sessions dropped since the last look to each registration that will
        tell its router (in its next heartbeat)."""
        evicted = self.slots.take_evicted()
        for reg in self.registrations:
            if reg.heard:
                reg.evicted.extend(evicted)
                for session in evicted:
                    reg.warmed.pop(session, None)
                    reg.answered.pop(session, None)

    def _send_heartbeat(self, only: Registration | None = None) -> None:
        """A heartbeat to `only`'s router, else to every router."""
        self._take_evicted()
        for reg in [only] if only is not None else self.registrations:
            evicted, reg.evicted = tuple(reg.evicted), []
            warmed, reg.warmed = tuple(reg.warmed.items()), {}
            answered, reg.answered = tuple(reg.answered.items()), {}
            reg.send(self._heartbeat(evicted, warmed, answered))

    def _heartbeat(self, evicted: tuple[SessionId, ...], warmed: tuple[tuple[str, str], ...],
                   answered: tuple[tuple[str, str], ...]) -> list[bytes]:
        kv_used, store_bytes = self.slots.kv_usage()
        disk = self.slots.disk
        return encode(Heartbeat(
            kv_used=kv_used,
            store_bytes=store_bytes,
            disk_states=disk.files if disk else 0,
            disk_bytes=disk.nbytes if disk else 0,
            disk_restored=disk.restored if disk else 0,
            disk_refused=sum(disk.refused.values()) if disk else 0,
            disk_refused_format=disk.refused["format"] if disk else 0,
            busy=self.slots.busy,
            warm=len(self.slots.warm_sessions()),
            evicted=evicted,
            warmed=warmed,
            answered=answered,
            tps=self.tps,
            prompt_tps=round(self.prompt_tps, 1),
            draining=self.phase is Phase.DRAINING,
        ))
