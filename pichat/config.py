"""Settings of each pichat service, as frozen dataclasses. The CLI only fills these in."""

from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from pichat.errors import PichatError
from pichat.protocol import DEFAULT_MAX_MESSAGE_BYTES
from pichat.router.policy.scheduler import Policy, SchedulerConfig
from pichat.security import Keys, is_loopback

__all__ = [
    "DEFAULT_CLIENT_ENDPOINT",
    "DEFAULT_WORKER_ENDPOINT",
    "DEFAULT_HEALTH_ENDPOINT",
    "Backend",
    "Engine",
    "KvType",
    "RouterConfig",
    "WorkerConfig",
    "SimConfig",
    "ClientConfig",
    "default_worker_name",
    "default_of",
    "check_exposure",
]

DEFAULT_CLIENT_PORT = 5555
DEFAULT_JOIN_PORT = 5557
DEFAULT_WORKER_PORT = 5556
DEFAULT_CLIENT_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_CLIENT_PORT}"
DEFAULT_WORKER_ENDPOINT = f"tcp://127.0.0.1:{DEFAULT_WORKER_PORT}"
DEFAULT_HEALTH_ENDPOINT = "ipc:///tmp/pichat-health.ipc"

Backend: TypeAlias = Literal["llama", "sim"]
Engine: TypeAlias = Literal["batched", "contexts"]
KvType: TypeAlias = Literal["f16", "q8_0", "q4_0"]
Memory: TypeAlias = Literal["summary", "none"]


def host_name() -> str:
    """This machine's short host name (what a Pi joins and announces itself under)."""
    return socket.gethostname().split(".")[0]


def default_worker_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def default_of(config: type, name: str) -> Any:
    """The default of a config dataclass's field: options and other configs that restate a
    setting take it from here, so each default is stated once."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    raise KeyError(f"{config.__name__} has no field {name!r}")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    clients_bind: str = f"tcp://*:{DEFAULT_CLIENT_PORT}"
    workers_bind: str = f"tcp://*:{DEFAULT_WORKER_PORT}"
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    heartbeat_interval: float = 1.0
    """Seconds between the router's heartbeats to workers and to waiting clients (a
    worker is dead after `scheduler.worker_expiry` of silence: heartbeat x liveness)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    drain_timeout: float = 30.0
    """On the first SIGTERM/SIGINT, how long running requests may finish."""
    health_bind: str = ""
    """Where to answer `pichat health` (see pichat/health.py); empty: nowhere."""
    http: str = "0.0.0.0:8080"
    """HOST:PORT of the HTTP face (OpenAI API, web page, metrics); empty: none."""
    api_keys: tuple[str, ...] = ()
    """With keys, every HTTP route but /health needs `Authorization: Bearer KEY`."""
    http_max_tokens: int = 512
    """Longest answer for HTTP requests that do not say (max_tokens)."""
    keys: Keys | None = None
    """CurveZMQ keys (pichat/security.py); None: plain TCP, allowed on loopback only..."""
    insecure: bool = False
    """... unless the operator says so."""
    max_prompt_chars: int = 1_000_000
    """Longest conversation (all message texts) a request may carry."""
    isolate_cache: bool = False
    """No KV reuse across owners at all (by default, only up to a message boundary)."""
    migration: Literal["auto", "off"] = "auto"
    """auto: a conversation placed on another worker than the one holding it warm takes
    its KV state along when moving it beats reading it again (pichat/router/daemon/migration.py);
    off: the other worker reads it."""
    status_per_s: float = 10.0
    """STATUS requests answered per second per client connection (twice that in a burst)."""
    db: str = "~/.local/state/pichat/conversations.db"
    """Where stored conversations are kept (an SQLite file); "off": nowhere."""
    db_max_mb: int = 1024
    """The conversation store's size at most (least recently used conversations dropped
    past it; one owner's past a quarter of it)."""
    db_max_conversations: int = 1000
    """Stored conversations per owner at most (more are refused)."""
    http_max_connections: int = 1024
    """Open HTTP connections at most; more are answered 503 and closed."""
    http_idle_timeout: float = 15.0
    """Seconds an HTTP connection may go without a complete request (a new one that sends
    no headers or dribbles them, an idle keep-alive one) before it is closed."""
    http_body_timeout: float = 30.0
    """Seconds a request's body may take to arrive."""
    discovery: bool = True
    """With keys: announce the router on the LAN (mDNS, `_pichat._tcp`)."""
    join_bind: str = f"tcp://*:{DEFAULT_JOIN_PORT}"
    """Where new Pis redeem join tokens (`pichat invite` / `pichat join`); only with keys;
    "off": none."""
    ready_file: str = ""
    """Write the bound endpoints here (JSON) once everything is up; empty: no file."""
    log_repeat_window: float = 60.0
    """Seconds repeated log lines of one kind are held back before one summary line."""
    floating_address: str = ""
    """The address keepalived moves between the router Pis: status and /metrics say whether
    this router's host holds it, and since when (empty: none)."""

    @property
    def policy(self) -> Policy:
        return self.scheduler.policy


@dataclass(frozen=True, slots=True)
class SimConfig:
    """The simulated backend's speeds (see pichat/worker/engine/sim.py)."""

    prompt_tps: float = 400.0
    gen_tps: float = 40.0
    reply_tokens: int = 24
    kv_bytes_per_token: int = 12_288


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    router: str = DEFAULT_WORKER_ENDPOINT
    """The router's worker endpoint, or several separated by commas: the worker registers
    with each (routers that share one store)."""
    name: str = field(default_factory=default_worker_name)
    backend: Backend = "llama"
    model: str = "default"
    """A GGUF path, or the name of a model pichat knows how to install (see `pichat models`)."""
    slots: int = 1
    """Conversations generated at once."""
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    """CPU threads for inference in all."""
    engine: Engine = "batched"
    """llama: `batched`, one context whose `slots` sequences are decoded together (one
    engine thread, all the threads); `contexts`, one context per slot, each with
    threads // slots (the design before the batched engine, kept for comparison)."""
    ctx: int = 8192
    """Tokens of context per slot (capped at the model's training context): room for what
    clients send, Open WebUI's 36 built-in tools (6.5k tokens) among it."""
    kv_type: KvType = "f16"
    """llama: what the KV cache stores, f16 or quantized (q8_0 about half the RAM, q4_0
    about a quarter; flash attention is on for those)."""
    discovery: bool = True
    """With the router's public key (a joined Pi): find the router on the LAN (mDNS) when
    no address is configured or the configured one stops answering."""
    embedding: bool = False
    """The model is an embedding model (nomic-embed, bge, MiniLM...): serve embeddings
    requests only (a chat model serves both)."""
    context_shift: bool = True
    """A conversation that slid out of the context keeps the KV cells of its kept turns,
    moved (llama.cpp's context shift), instead of reading them again; an answer that
    reaches the end of the context shifts it and goes on (the batched engine)."""
    slide_block: int = 0
    """Tokens that leave the context at once when a conversation slides (0: a quarter of
    ctx; 1: just enough, every turn)."""
    memory: Memory = "summary"
    """What a sliding conversation keeps of the turns that leave: `summary`, a note the
    model writes, kept after the system prompt; `none`."""
    cache_mb: int = 256
    """RAM for saved KV states of conversations that are not in a slot."""
    state_dir: str = ""
    """A directory where every conversation's KV state is kept after each turn, so a
    restarted worker finds them warm ("": none)."""
    disk_cache_mb: int = 2048
    """Disk for those states at most (least recently used deleted first)."""
    heartbeat_interval: float = 1.0
    liveness: int = 3
    reconnect_max: float = 30.0
    """Cap of the reconnect backoff, seconds."""
    drain_timeout: float = 30.0
    """On SIGTERM, how long running requests may finish before the worker leaves."""
    chunk_tokens: int = 16
    chunk_interval: float = 0.05
    """A CHUNK goes out after this many tokens or this many seconds, whichever comes first
    (the first token always goes out at once)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    health_bind: str = ""
    keys: Keys | None = None
    key_name: str = "worker"
    """Which key pair in the keys directory is this worker's."""
    sim: SimConfig = field(default_factory=SimConfig)

    @property
    def routers(self) -> tuple[str, ...]:
        return endpoints(self.router, DEFAULT_WORKER_ENDPOINT)


@dataclass(frozen=True, slots=True)
class ClientConfig:
    router: str = DEFAULT_CLIENT_ENDPOINT
    """The router's client endpoint, or several separated by commas (routers that share
    one store): the client uses the first that answers, and moves to the next when the one
    it uses falls silent."""
    silence_timeout: float | None = None
    """Give up on the router after hearing nothing from it this long while waiting (it
    heartbeats every second). By default 5 s with one router, 3 s with several: there
    another router takes the request, so moving on early costs little (`silence`)."""
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    keys: Keys | None = None
    key_name: str = "client"
    resend_on_silence: int = 1
    """Times a request is sent again when the router falls silent (it may have restarted):
    as it was if nothing has streamed yet, else as a continuation after the tokens
    received (safe either way: nothing is delivered twice). With several routers, once
    more for each other router."""

    @property
    def routers(self) -> tuple[str, ...]:
        return endpoints(self.router, DEFAULT_CLIENT_ENDPOINT)

    @property
    def silence(self) -> float:
        """The silence limit in force (`silence_timeout`, else its default)."""
        if self.silence_timeout is not None:
            return self.silence_timeout
        return 3.0 if len(self.routers) > 1 else 5.0


def endpoints(text: str, default: str) -> tuple[str, ...]:
    """The endpoints in `text`, separated by commas (a ZeroMQ endpoint holds none), each
    once, in order; `default` if there are none."""
    return tuple(dict.fromkeys(e.strip() for e in text.split(",") if e.strip())) or (default,)


def check_exposure(cfg: RouterConfig) -> None:
    """Secure by default: a router binds nothing beyond this machine without keys, and serves
    HTTP beyond it only with API keys (unless the operator says --insecure)."""
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
