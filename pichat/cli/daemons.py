"""`pichat router` and `pichat worker`: options in, a config object out, the service runs."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import IO, Any

import click

from pichat.cli import options as o
from pichat.config import (
    RouterConfig,
    SimConfig,
    WorkerConfig,
    default_worker_name,
    host_name,
)
from pichat.errors import PichatError
from pichat.invites import stored_router
from pichat.router.policy.scheduler import POLICIES, SchedulerConfig
from pichat.security import Keys

__all__ = ["router", "worker", "model_options"]

log = logging.getLogger(__name__)

R, S, W = RouterConfig, SchedulerConfig, WorkerConfig


@click.command()
@o.field(R, "clients_bind", "--clients-bind", env="CLIENTS_BIND",
         help="ZeroMQ endpoint where clients connect.")
@o.field(R, "workers_bind", "--workers-bind", env="WORKERS_BIND",
         help="ZeroMQ endpoint where workers connect.")
@o.option("--discovery/--no-discovery", "discovery", env="DISCOVERY",
          default=o.default(R, "discovery"),
          help="With keys: announce the router on the LAN (mDNS _pichat._tcp).")
@o.field(R, "join_bind", "--join-bind", env="JOIN_BIND",
         help="ZeroMQ endpoint where new Pis redeem join tokens (`pichat invite`); only "
              "with keys; 'off' for none.")
@o.field(S, "policy", "--policy", env="POLICY", type=click.Choice(POLICIES),
         help="affinity: a session returns to the worker holding its KV cache; "
              "round-robin: the baseline.")
@o.field(S, "affinity_wait", "--affinity-wait", env="AFFINITY_WAIT", type=click.FloatRange(0),
         help="The longest a request waits for its busy warm worker; sooner, it goes to "
              "another when that is expected to start it sooner (state move or re-read "
              "counted).")
@o.field(R, "migration", "--migration", env="MIGRATION", type=click.Choice(["auto", "off"]),
         help="auto: a conversation that changes worker takes its KV state along when that "
              "beats reading it again; off: never.")
@o.field(S, "prefix_load_factor", "--prefix-load-factor", env="PREFIX_LOAD_FACTOR",
         type=click.FloatRange(1.0),
         help="A worker holding a prefix that a new conversation shares (a common system "
              "prompt) gets it while its load stays within this times the average.")
@o.field(S, "max_sessions", "--max-sessions", env="MAX_SESSIONS", type=click.IntRange(1),
         help="Conversations whose worker the router remembers (least recently used "
              "forgotten first; ~1 KB each with their prefixes).")
@o.field(S, "queue_limit", "--queue-limit", env="QUEUE_LIMIT", type=click.IntRange(0),
         help="Requests that may wait for a slot; beyond it clients get 'busy' at once.")
@o.field(S, "queue_timeout", "--queue-timeout", env="QUEUE_TIMEOUT",
         type=click.FloatRange(0.001), help="Seconds a request may wait for a slot.")
@o.field(S, "startup_grace", "--startup-grace", env="STARTUP_GRACE", type=click.FloatRange(0),
         help="Seconds after the router starts in which requests wait for workers to "
              "register (they come back by themselves after a restart) instead of failing "
              "with 'no workers' at once.")
@o.field(S, "request_timeout", "--request-timeout", env="REQUEST_TIMEOUT",
         type=click.FloatRange(0.001), help="Seconds a request may take in all.")
@o.field(R, "drain_timeout", "--drain-timeout", env="DRAIN_TIMEOUT", type=click.FloatRange(0),
         help="On SIGTERM, seconds running requests may finish.")
@o.field(R, "http", "--http", env="HTTP",
         help="HOST:PORT of the HTTP face: OpenAI-compatible API (/v1), web chat page (/), "
              "metrics (/metrics). 'off' disables it.")
@o.option("--api-key", "api_keys", env="API_KEYS", multiple=True, show_default=False,
          help="Require `Authorization: Bearer KEY` on HTTP (repeatable; the variable splits "
               "on spaces).")
@o.option("--api-key-file", env="API_KEY_FILE", default=None,
          type=click.Path(exists=True, dir_okay=False),
          help="A file of API keys, one per line (# comments) [default: KEYS/api-keys when "
               "the keys directory has one].")
@o.field(R, "http_max_tokens", "--max-tokens", env="HTTP_MAX_TOKENS", type=click.IntRange(1),
         help="Longest answer for HTTP requests that do not say.")
@o.heartbeat
@o.liveness
@o.max_message_bytes
@o.health_bind
@o.keys
@o.option("--insecure", env="INSECURE", is_flag=True,
          help="Allow binding beyond loopback without keys (a network you trust).")
@o.field(R, "max_prompt_chars", "--max-prompt-chars", env="MAX_PROMPT_CHARS",
         type=click.IntRange(1), help="Longest conversation a request may carry, characters.")
@o.option("--isolate-cache", env="ISOLATE_CACHE", is_flag=True,
          help="No KV cache reuse between owners (API keys, client keys) at all; by default "
               "one owner's cached tokens serve another only for the leading system "
               "messages (a shared system prompt).")
@o.field(S, "owner_max_running", "--owner-max-running", env="OWNER_MAX_RUNNING",
         type=click.IntRange(0),
         help="Requests one owner (a client key, an API key) may have running; 0: no cap "
              "(owners take turns for free slots either way).")
@o.field(S, "owner_max_queued", "--owner-max-queued", env="OWNER_MAX_QUEUED",
         type=click.IntRange(0),
         help="Requests one owner may have waiting; 0: no cap (a full queue is shared "
              "equally between the owners waiting).")
@o.field(S, "cancel_grace", "--cancel-grace", env="CANCEL_GRACE", type=click.FloatRange(0.1),
         help="Seconds a worker has to confirm a cancel before the router frees its slot "
              "anyway.")
@o.field(R, "status_per_s", "--status-per-s", env="STATUS_PER_S", type=click.FloatRange(0.1),
         help="Fresh STATUS snapshots per second per client connection (beyond it: the last "
              "one).")
@o.field(R, "http_max_connections", "--http-max-connections", env="HTTP_MAX_CONNECTIONS",
         type=click.IntRange(1),
         help="Open HTTP connections at most (a quarter of them per address); more get 503.")
@o.field(R, "http_idle_timeout", "--http-idle-timeout", env="HTTP_IDLE_TIMEOUT",
         type=click.FloatRange(0.1),
         help="Seconds an HTTP connection may go without a complete request (new, slow to "
              "send its headers, or idle) before it is closed.")
@o.field(R, "http_body_timeout", "--http-body-timeout", env="HTTP_BODY_TIMEOUT",
         type=click.FloatRange(0.1), help="Seconds a request body may take to arrive.")
@o.field(R, "floating_address", "--floating-address", env="FLOATING_ADDRESS",
         help="The address keepalived moves between the router Pis (two routers): "
              "`pichat status` and /metrics say whether this router's host holds it.")
@o.field(R, "log_repeat_window", "--log-repeat-window", env="LOG_REPEAT_WINDOW",
         type=click.FloatRange(0.1),
         help="Repeated log lines of one kind (refused handshakes, bad messages) are held "
              "back for this many seconds and then summed up in one line.")
@o.field(R, "db", "--db", env="DB",
         help="Keep conversations here: an SQLite file; etcd://HOST:2379,HOST:2379,HOST:2379 "
              "(several routers, surviving any one host); or postgresql://USER:PASSWORD@HOST/DB "
              "(PICHAT_DB keeps the password off the command line); 'off' for none.")
@o.field(R, "db_max_mb", "--db-max-mb", env="DB_MAX_MB", type=click.IntRange(1),
         help="Size of the conversation store at most: the least recently used are dropped "
              "past it (one user's past a quarter of it).")
@o.field(R, "db_max_conversations", "--db-max-conversations", env="DB_MAX_CONVERSATIONS",
         type=click.IntRange(1), help="Stored conversations per user at most.")
@o.field(R, "ready_file", "--ready-file", env="READY_FILE", show_default=False,
         help="Once everything is up, write the bound endpoints here as JSON (port 0 "
              "resolved).")
@o.log_level
def router(**opts: Any) -> None:
    """Run the router: the broker between clients and workers.

    \b
    Example (on the Pi that runs the router):
      pichat router --clients-bind tcp://*:5555 --workers-bind tcp://*:5556
      pichat router --http 0.0.0.0:8080 --api-key-file /etc/pichat/api-keys
    """
    from pichat.router.daemon.router import Router

    o.setup_logging(opts["log_level"], "router")
    keys = o.keys_or_fail(opts["keys"])
    http = opts["http"]
    config = o.build(
        RouterConfig, opts,
        scheduler=o.build(SchedulerConfig, opts,
                          worker_expiry=opts["heartbeat_interval"] * opts["liveness"]),
        http="" if http.lower() in ("", "off", "none") else http,
        api_keys=_api_keys(opts["api_keys"], opts["api_key_file"], keys),
        keys=keys)
    try:
        asyncio.run(Router(config).run(handle_signals=True))
    except Exception as exc:  # bind failures and the like: say so plainly
        o.fail(exc)


def _api_keys(given: tuple[str, ...], path: str | None, keys: Keys | None) -> tuple[str, ...]:
    """--api-key and --api-key-file; else the keys directory's api-keys, if any."""
    found = tuple(given) + _read_keys(path)
    if not found and keys is not None and (keys.directory / "api-keys").is_file():
        found = _read_keys(str(keys.directory / "api-keys"))
    return found


def _read_keys(path: str | None) -> tuple[str, ...]:
    if path is None:
        return ()
    with open(path) as f:
        keys = tuple(k for k in (line.split("#", 1)[0].strip() for line in f) if k)
    if not keys:
        raise click.BadParameter(f"{path} holds no keys", param_hint="--api-key-file")
    return keys


def model_options(f: Any) -> Any:
    """The options a worker and `pichat up` share: which model, and how it is served."""
    for decorator in reversed([
        o.field(W, "backend", "--backend", env="BACKEND", type=click.Choice(["llama", "sim"]),
                help="llama: a GGUF model via llama.cpp; sim: a simulator for tests and "
                     "benchmarks."),
        o.field(W, "model", "--model", env="MODEL",
                help="A GGUF file, or a known model name (see `pichat models`)."),
        o.field(W, "slots", "--slots", env="SLOTS", type=click.IntRange(1, 64),
                help="Requests generated at once."),
        o.field(W, "ctx", "--ctx", env="CTX", type=click.IntRange(64),
                help="Context length in tokens (prompt + answer) per slot."),
    ]):
        f = decorator(f)
    return f


@click.command()
@o.field(W, "router", "--router", env="WORKER_ROUTER",
         help="The router's worker endpoint, or several separated by commas (routers "
              "sharing one store): the worker registers with each.")
@o.option("--name", env="WORKER_NAME", default=None,
          help="Name shown in status [default: the name it joined under, else HOSTNAME-PID].")
@model_options
@o.option("--discovery/--no-discovery", "discovery", env="DISCOVERY",
          default=o.default(W, "discovery"),
          help="Find the router on the LAN (mDNS) when no --router is set or it stops "
               "answering; only a router with the key this Pi holds is taken.")
@o.option("--embedding", "embedding", env="EMBEDDING", is_flag=True,
          default=o.default(W, "embedding"),
          help="The model is an embedding model: serve /v1/embeddings only (a chat model "
               "serves embeddings too, from its own hidden states).")
@o.field(W, "memory", "--memory", env="MEMORY", type=click.Choice(["summary", "none"]),
         help="What a conversation too long for the context keeps of the turns that "
              "slide out: a note the model writes of them, or nothing.")
@o.option("--context-shift/--no-context-shift", "context_shift", env="CONTEXT_SHIFT",
          default=o.default(W, "context_shift"),
          help="Move a sliding conversation's KV cells instead of reading its kept "
               "turns again; a long answer shifts the context and goes on.")
@o.field(W, "slide_block", "--slide-block", env="SLIDE_BLOCK", type=click.IntRange(0),
         help="Tokens that leave the context at once when a conversation slides "
              "(0: a quarter of --ctx; 1: just enough, every turn).")
@o.field(W, "threads", "--threads", env="THREADS", type=click.IntRange(1),
         help="CPU threads for inference, shared by the slots.")
@o.field(W, "engine", "--engine", env="ENGINE", type=click.Choice(["batched", "contexts"]),
         help="llama: batched decodes the slots' sequences together in one context; "
              "contexts gives each slot its own context (the former design).")
@o.field(W, "kv_type", "--kv-type", env="KV_TYPE", type=click.Choice(["f16", "q8_0", "q4_0"]),
         help="llama: KV cache type; q8_0 holds twice as many tokens per MB, q4_0 four times.")
@o.field(W, "cache_mb", "--cache-mb", env="CACHE_MB", type=click.IntRange(0),
         help="RAM for KV states of conversations waiting outside a slot.")
@o.field(W, "state_dir", "--state-dir", env="STATE_DIR",
         help="Keep conversations' KV states here after each turn, warm across restarts.")
@o.field(W, "disk_cache_mb", "--disk-cache-mb", env="DISK_CACHE_MB", type=click.IntRange(1),
         help="Disk for --state-dir at most (least recently used deleted first).")
@o.field(W, "chunk_tokens", "--chunk-tokens", env="CHUNK_TOKENS", type=click.IntRange(1),
         help="Tokens per streamed chunk at most.")
@o.field(W, "chunk_interval", "--chunk-interval", env="CHUNK_INTERVAL",
         type=click.FloatRange(0), help="Seconds a token may wait to be sent with others.")
@o.field(W, "drain_timeout", "--drain-timeout", env="DRAIN_TIMEOUT", type=click.FloatRange(0),
         help="On SIGTERM, seconds running requests may finish before the worker leaves.")
@o.field(SimConfig, "prompt_tps", "--sim-prompt-tps", env="SIM_PROMPT_TPS",
         type=click.FloatRange(1), help="sim: prompt tokens evaluated per second.")
@o.field(SimConfig, "gen_tps", "--sim-gen-tps", env="SIM_GEN_TPS", type=click.FloatRange(0.1),
         help="sim: tokens generated per second.")
@o.field(SimConfig, "reply_tokens", "--sim-reply-tokens", env="SIM_REPLY_TOKENS",
         type=click.IntRange(1), help="sim: length of an answer.")
@o.heartbeat
@o.liveness
@o.max_message_bytes
@o.health_bind
@o.keys
@o.field(W, "key_name", "--key-name", env="WORKER_KEY_NAME",
         help="This worker's key pair in the keys directory.")
@o.option("--join", "join", env="JOIN", default=None, show_default=False,
          help="A worker token from `pichat invite` (or a file holding one): join with it "
               "first, unless the keys directory has joined already. With --keys PARENT/* "
               "each replica joins with keys of its own under PARENT.")
@o.log_level
def worker(**opts: Any) -> None:
    """Run a worker: serve a model to the router.

    \b
    Examples:
      pichat worker --router tcp://pi1:5556                     # the default model
      pichat worker --router tcp://pi1:5556 --model ~/llama-3.2-1b-q4.gguf --slots 2
      pichat worker --backend sim --slots 4                     # no model: a simulator
    """
    from pichat.worker.daemon.worker import Worker
    from pichat.worker.engine import load_model

    o.setup_logging(opts["log_level"], f"worker {opts['name'] or ''}".strip())
    held = _joined_keys(opts)  # noqa: F841 (a claimed keys directory, held while we run)
    keys = o.keys_or_fail(opts["keys"])
    opts["router"] = o.joined_router(opts["router"], o.default(W, "router"), keys, "workers")
    try:
        joined_as = stored_router(keys.directory, "name") if keys is not None else None
    except PichatError as exc:
        o.fail(exc)
    config = o.build(WorkerConfig, opts, name=opts["name"] or joined_as or default_worker_name(),
                     keys=keys, sim=o.build(SimConfig, opts))

    async def serve() -> None:
        loaded = load_model(config)
        await Worker(config, loaded).run(handle_signals=True)

    try:
        asyncio.run(serve())
    except PichatError as exc:
        o.fail(exc)


JOIN_PATIENCE = 300.0
"""Seconds `worker --join` keeps trying a router that does not answer (one starting)."""


def _joined_keys(opts: dict[str, Any]) -> IO[str] | None:
    """--keys PARENT/*: claim a directory of its own under PARENT (and, with --state-dir
    OTHER/* too, OTHER/ the same number: the KV states a replica keeps are leased to its
    key, so a restarted replica must find its states and its key together); --join: join
    with the token unless joined already. Sets opts["keys"] to the directory; returns the
    claim."""
    from pichat.claims import claim, is_pattern
    from pichat.cli.joining import Unreachable, join_once
    from pichat.security import DEFAULT_KEYS_DIR

    spec, held = opts["keys"], None
    try:
        if spec and is_pattern(spec):
            directory, held = claim(str(Path(spec).expanduser()), "worker", "a --keys")
            spec = opts["keys"] = str(directory)
            if opts["state_dir"] and is_pattern(opts["state_dir"]):
                opts["state_dir"] = str(Path(opts["state_dir"]).parent / directory.name)
            log.info("keys in %s, KV states in %s", directory, opts["state_dir"] or "memory")
        if not opts["join"]:
            return held
        directory = Path(spec or DEFAULT_KEYS_DIR).expanduser()
        name = opts["name"] or host_name()
        deadline = time.monotonic() + JOIN_PATIENCE
        while True:
            try:
                if join_once(opts["join"], directory, "worker", name):
                    log.info("joined the cluster as %r; keys in %s", name, directory)
                break
            except Unreachable as exc:  # no answer yet: a router still starting
                if time.monotonic() > deadline:
                    raise
                log.warning("joining: %s; trying again", exc)
                time.sleep(3)
        opts["keys"] = str(directory)
        return held
    except PichatError as exc:
        o.fail(exc)
