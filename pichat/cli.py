"""The `pichat` command: options in, a config object out, then the service runs.

Every option can also be set by the environment variable shown in `--help` (PICHAT_*),
so a systemd EnvironmentFile or a compose file can hold the whole configuration.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from pichat import __version__
from pichat.config import (
    DEFAULT_CLIENT_ENDPOINT,
    DEFAULT_HEALTH_ENDPOINT,
    DEFAULT_WORKER_ENDPOINT,
    ClientConfig,
    RouterConfig,
    SimConfig,
    WorkerConfig,
    default_worker_name,
)
from pichat.errors import PichatError
from pichat.protocol import DEFAULT_MAX_MESSAGE_BYTES, Sampling
from pichat.router.scheduler import POLICIES, SchedulerConfig
from pichat.security import DEFAULT_KEYS_DIR, Keys, keygen, resolve_keys

__all__ = ["main"]


def _option(*names: str, env: str, **kwargs: Any) -> Any:
    kwargs.setdefault("show_default", True)
    return click.option(*names, envvar=f"PICHAT_{env}", show_envvar=True, **kwargs)


def _default(config: type, name: str) -> Any:
    """The default of a config dataclass's field: options take their defaults from there."""
    for f in dataclasses.fields(config):
        if f.name == name:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default
    raise KeyError(name)


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname).1s [{role}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


def _fail(exc: Exception) -> None:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


log_level_option = _option("--log-level", env="LOG_LEVEL", default="info",
                           type=click.Choice(["debug", "info", "warning", "error"]),
                           help="How much the daemon logs.")
max_message_option = _option("--max-message-bytes", env="MAX_MESSAGE_BYTES",
                             default=DEFAULT_MAX_MESSAGE_BYTES, type=click.IntRange(1024),
                             help="Largest message accepted on any socket; bigger ones drop "
                                  "the connection.")
heartbeat_option = _option("--heartbeat", env="HEARTBEAT", default=1.0,
                           type=click.FloatRange(0.05), help="Seconds between heartbeats.")
health_bind_option = _option("--health-bind", env="HEALTH_BIND", default="",
                             help="Answer `pichat health` on this endpoint, e.g. "
                                  "ipc:///tmp/pichat-health.ipc [default: off].",
                             show_default=False)
keys_option = _option("--keys", env="KEYS", default=None, show_default=False,
                      help="CurveZMQ keys directory (`pichat keygen`) [default: "
                           "~/.config/pichat/keys if it exists]; 'off' for none.")
liveness_option = _option("--liveness", env="LIVENESS", default=3, type=click.IntRange(1),
                          help="Missed heartbeats after which the peer counts as dead.")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="pichat")
def main() -> None:
    """pichat: one chat service from a handful of small computers.

    \b
    Quick start on one machine:
      pichat up --workers 2              # a router and two workers
      pichat ask "Hello, how are you?"   # in another shell
    """


# --- router ---------------------------------------------------------------------------


@main.command()
@_option("--clients-bind", env="CLIENTS_BIND", default="tcp://*:5555",
         help="ZeroMQ endpoint where clients connect.")
@_option("--workers-bind", env="WORKERS_BIND", default="tcp://*:5556",
         help="ZeroMQ endpoint where workers connect.")
@_option("--policy", env="POLICY", default="affinity", type=click.Choice(POLICIES),
         help="affinity: a session returns to the worker holding its KV cache; "
              "round-robin: the baseline.")
@_option("--affinity-wait", env="AFFINITY_WAIT", default=5.0, type=click.FloatRange(0),
         help="Seconds a request waits for its busy warm worker before spilling to another.")
@_option("--prefix-load-factor", env="PREFIX_LOAD_FACTOR", default=1.25,
         type=click.FloatRange(1.0),
         help="A worker holding a prefix that a new conversation shares (a common system "
              "prompt) gets it while its load stays within this times the average.")
@_option("--max-sessions", env="MAX_SESSIONS", default=20_000, type=click.IntRange(1),
         help="Conversations whose worker the router remembers (least recently used "
              "forgotten first; ~1 KB each with their prefixes).")
@_option("--queue-limit", env="QUEUE_LIMIT", default=256, type=click.IntRange(0),
         help="Requests that may wait for a slot; beyond it clients get 'busy' at once.")
@_option("--queue-timeout", env="QUEUE_TIMEOUT", default=120.0, type=click.FloatRange(0.001),
         help="Seconds a request may wait for a slot.")
@_option("--startup-grace", env="STARTUP_GRACE", default=10.0, type=click.FloatRange(0),
         help="Seconds after the router starts in which requests wait for workers to "
              "register (they come back by themselves after a restart) instead of failing "
              "with 'no workers' at once.")
@_option("--request-timeout", env="REQUEST_TIMEOUT", default=600.0,
         type=click.FloatRange(0.001), help="Seconds a request may take in all.")
@_option("--drain-timeout", env="DRAIN_TIMEOUT", default=30.0, type=click.FloatRange(0),
         help="On SIGTERM, seconds running requests may finish.")
@_option("--http", env="HTTP", default="0.0.0.0:8080",
         help="HOST:PORT of the HTTP face: OpenAI-compatible API (/v1), web chat page (/), "
              "metrics (/metrics). 'off' disables it.")
@_option("--api-key", "api_keys", env="API_KEYS", multiple=True, show_default=False,
         help="Require `Authorization: Bearer KEY` on HTTP (repeatable; the variable splits "
              "on spaces).")
@_option("--api-key-file", env="API_KEY_FILE", default=None,
         type=click.Path(exists=True, dir_okay=False),
         help="A file of API keys, one per line (# comments) [default: KEYS/api-keys when "
              "the keys directory has one].")
@_option("--max-tokens", "http_max_tokens", env="HTTP_MAX_TOKENS", default=512,
         type=click.IntRange(1), help="Longest answer for HTTP requests that do not say.")
@heartbeat_option
@liveness_option
@max_message_option
@health_bind_option
@keys_option
@_option("--insecure", env="INSECURE", is_flag=True,
         help="Allow binding beyond loopback without keys (a network you trust).")
@_option("--max-prompt-chars", env="MAX_PROMPT_CHARS", default=1_000_000,
         type=click.IntRange(1), help="Longest conversation a request may carry, characters.")
@_option("--isolate-cache", env="ISOLATE_CACHE", is_flag=True,
         help="No KV cache reuse between owners (API keys, client keys) at all; by default "
              "one owner's cached tokens serve another only up to a whole-message boundary "
              "(a shared system prompt).")
@_option("--owner-max-running", env="OWNER_MAX_RUNNING",
         default=_default(SchedulerConfig, "owner_max_running"), type=click.IntRange(0),
         help="Requests one owner (a client key, an API key) may have running; 0: no cap "
              "(owners take turns for free slots either way).")
@_option("--owner-max-queued", env="OWNER_MAX_QUEUED",
         default=_default(SchedulerConfig, "owner_max_queued"), type=click.IntRange(0),
         help="Requests one owner may have waiting; 0: no cap (a full queue is shared "
              "equally between the owners waiting).")
@_option("--cancel-grace", env="CANCEL_GRACE", default=_default(SchedulerConfig, "cancel_grace"),
         type=click.FloatRange(0.1), help="Seconds a worker has to confirm a cancel before "
                                          "the router frees its slot anyway.")
@_option("--status-per-s", env="STATUS_PER_S", default=_default(RouterConfig, "status_per_s"),
         type=click.FloatRange(0.1), help="STATUS requests answered per second per client "
                                          "connection (twice as many in a burst).")
@_option("--http-max-connections", env="HTTP_MAX_CONNECTIONS",
         default=_default(RouterConfig, "http_max_connections"), type=click.IntRange(1),
         help="Open HTTP connections at most (a quarter of them per address); more get 503.")
@_option("--http-idle-timeout", env="HTTP_IDLE_TIMEOUT",
         default=_default(RouterConfig, "http_idle_timeout"), type=click.FloatRange(0.1),
         help="Seconds an HTTP connection may go without a complete request (new, slow to "
              "send its headers, or idle) before it is closed.")
@_option("--http-body-timeout", env="HTTP_BODY_TIMEOUT",
         default=_default(RouterConfig, "http_body_timeout"), type=click.FloatRange(0.1),
         help="Seconds a request body may take to arrive.")
@_option("--log-repeat-window", env="LOG_REPEAT_WINDOW",
         default=_default(RouterConfig, "log_repeat_window"), type=click.FloatRange(0.1),
         help="Repeated log lines of one kind (refused handshakes, bad messages) are held "
              "back for this many seconds and then summed up in one line.")
@_option("--ready-file", env="READY_FILE", default="", show_default=False,
         help="Once everything is up, write the bound endpoints here as JSON (port 0 "
              "resolved).")
@log_level_option
def router(clients_bind: str, workers_bind: str, policy: str, affinity_wait: float,
           prefix_load_factor: float, max_sessions: int, queue_limit: int,
           queue_timeout: float, startup_grace: float,
           request_timeout: float, drain_timeout: float, http: str, api_keys: tuple[str, ...],
           api_key_file: str | None, http_max_tokens: int, heartbeat: float, liveness: int,
           max_message_bytes: int, health_bind: str, keys: str | None, insecure: bool,
           max_prompt_chars: int, isolate_cache: bool, owner_max_running: int,
           owner_max_queued: int, cancel_grace: float, status_per_s: float,
           http_max_connections: int, http_idle_timeout: float, http_body_timeout: float,
           log_repeat_window: float, ready_file: str, log_level: str) -> None:
    """Run the router: the broker between clients and workers.

    \b
    Example (on the Pi that runs the router):
      pichat router --clients-bind tcp://*:5555 --workers-bind tcp://*:5556
      pichat router --http 0.0.0.0:8080 --api-key-file /etc/pichat/api-keys
    """
    from pichat.router.service import Router

    _setup_logging(log_level, "router")
    resolved_keys = keys_or_fail(keys)
    config = RouterConfig(
        clients_bind=clients_bind,
        workers_bind=workers_bind,
        scheduler=SchedulerConfig(
            policy=policy,  # type: ignore[arg-type]
            affinity_wait=affinity_wait,
            prefix_load_factor=prefix_load_factor,
            max_sessions=max_sessions,
            queue_limit=queue_limit,
            queue_timeout=queue_timeout,
            startup_grace=startup_grace,
            request_timeout=request_timeout,
            worker_expiry=heartbeat * liveness,
            owner_max_running=owner_max_running,
            owner_max_queued=owner_max_queued,
            cancel_grace=cancel_grace,
        ),
        heartbeat_interval=heartbeat,
        liveness=liveness,
        max_message_bytes=max_message_bytes,
        drain_timeout=drain_timeout,
        health_bind=health_bind,
        http="" if http.lower() in ("", "off", "none") else http,
        api_keys=_api_keys(api_keys, api_key_file, resolved_keys),
        http_max_tokens=http_max_tokens,
        keys=resolved_keys,
        insecure=insecure,
        max_prompt_chars=max_prompt_chars,
        isolate_cache=isolate_cache,
        status_per_s=status_per_s,
        http_max_connections=http_max_connections,
        http_idle_timeout=http_idle_timeout,
        http_body_timeout=http_body_timeout,
        log_repeat_window=log_repeat_window,
        ready_file=ready_file,
    )
    try:
        asyncio.run(Router(config).run(handle_signals=True))
    except Exception as exc:  # bind failures and the like: say so plainly
        _fail(exc)


def keys_or_fail(option: str | None) -> Keys | None:
    try:
        return resolve_keys(option)
    except PichatError as exc:
        _fail(exc)
        raise


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


# --- worker ---------------------------------------------------------------------------


@main.command()
@_option("--router", env="WORKER_ROUTER", default=DEFAULT_WORKER_ENDPOINT,
         help="The router's worker endpoint.")
@_option("--name", env="WORKER_NAME", default=None, help="Name shown in status "
         "[default: HOSTNAME-PID].")
@_option("--backend", env="BACKEND", default="llama", type=click.Choice(["llama", "sim"]),
         help="llama: a GGUF model via llama.cpp; sim: a simulator for tests and benchmarks.")
@_option("--model", env="MODEL", default="default",
         help="A GGUF file, or a known model name (see `pichat models`).")
@_option("--slots", env="SLOTS", default=1, type=click.IntRange(1, 64),
         help="Requests generated at once.")
@_option("--threads", env="THREADS", default=os.cpu_count() or 1, type=click.IntRange(1),
         help="CPU threads for inference, shared by the slots.")
@_option("--ctx", env="CTX", default=4096, type=click.IntRange(64),
         help="Context length in tokens (prompt + answer) per slot.")
@_option("--cache-mb", env="CACHE_MB", default=256, type=click.IntRange(0),
         help="RAM for KV states of conversations waiting outside a slot.")
@_option("--chunk-tokens", env="CHUNK_TOKENS", default=16, type=click.IntRange(1),
         help="Tokens per streamed chunk at most.")
@_option("--chunk-interval", env="CHUNK_INTERVAL", default=0.05, type=click.FloatRange(0),
         help="Seconds a token may wait to be sent with others.")
@_option("--drain-timeout", env="DRAIN_TIMEOUT", default=30.0, type=click.FloatRange(0),
         help="On SIGTERM, seconds running requests may finish before the worker leaves.")
@_option("--sim-prompt-tps", env="SIM_PROMPT_TPS", default=400.0, type=click.FloatRange(1),
         help="sim: prompt tokens evaluated per second.")
@_option("--sim-gen-tps", env="SIM_GEN_TPS", default=40.0, type=click.FloatRange(0.1),
         help="sim: tokens generated per second.")
@_option("--sim-reply-tokens", env="SIM_REPLY_TOKENS", default=24, type=click.IntRange(1),
         help="sim: length of an answer.")
@heartbeat_option
@liveness_option
@max_message_option
@health_bind_option
@keys_option
@_option("--key-name", env="WORKER_KEY_NAME", default="worker",
         help="This worker's key pair in the keys directory.")
@log_level_option
def worker(router: str, name: str | None, backend: str, model: str, slots: int,
           threads: int, ctx: int, cache_mb: int, chunk_tokens: int, chunk_interval: float,
           drain_timeout: float,
           sim_prompt_tps: float, sim_gen_tps: float, sim_reply_tokens: int,
           heartbeat: float, liveness: int, max_message_bytes: int, health_bind: str,
           keys: str | None, key_name: str, log_level: str) -> None:
    """Run a worker: serve a model to the router.

    \b
    Examples:
      pichat worker --router tcp://pi1:5556                     # the default model
      pichat worker --router tcp://pi1:5556 --model ~/llama-3.2-1b-q4.gguf --slots 2
      pichat worker --backend sim --slots 4                     # no model: a simulator
    """
    from pichat.worker import load_model
    from pichat.worker.service import Worker

    _setup_logging(log_level, f"worker {name or ''}".strip())
    config = WorkerConfig(
        router=router,
        name=name or default_worker_name(),
        backend=backend,  # type: ignore[arg-type]
        model=model,
        slots=slots,
        threads=threads,
        ctx=ctx,
        cache_mb=cache_mb,
        heartbeat_interval=heartbeat,
        liveness=liveness,
        chunk_tokens=chunk_tokens,
        chunk_interval=chunk_interval,
        drain_timeout=drain_timeout,
        max_message_bytes=max_message_bytes,
        health_bind=health_bind,
        keys=keys_or_fail(keys),
        key_name=key_name,
        sim=SimConfig(prompt_tps=sim_prompt_tps, gen_tps=sim_gen_tps,
                      reply_tokens=sim_reply_tokens),
    )

    async def serve() -> None:
        loaded = load_model(config)
        await Worker(config, loaded).run(handle_signals=True)

    try:
        asyncio.run(serve())
    except PichatError as exc:
        _fail(exc)


# --- clients --------------------------------------------------------------------------

def _client_options(f: Any) -> Any:
    """--router, --keys, --key-name, gathered into one `client` ClientConfig argument."""

    @functools.wraps(f)
    def wrapper(*args: Any, router: str, keys: str | None, key_name: str, **kwargs: Any) -> Any:
        try:
            resolved = resolve_keys(keys)
        except PichatError as exc:
            _fail(exc)
        return f(*args, client=ClientConfig(router=router, keys=resolved, key_name=key_name),
                 **kwargs)

    for decorator in reversed([
        _option("--router", env="ROUTER", default=DEFAULT_CLIENT_ENDPOINT,
                help="The router's client endpoint."),
        keys_option,
        _option("--key-name", env="CLIENT_KEY_NAME", default="client",
                help="This client's key pair in the keys directory."),
    ]):
        wrapper = decorator(wrapper)
    return wrapper
timeout_option = _option("--timeout", env="TIMEOUT", default=None, type=click.FloatRange(0.001),
                         help="Seconds to wait for a whole answer [default: the router's].")


def _sampling_options(f: Any) -> Any:
    defaults = Sampling()
    for decorator in reversed([
        _option("--max-tokens", env="MAX_TOKENS", default=defaults.max_tokens,
                type=click.IntRange(1), help="Longest answer, in tokens."),
        _option("--temperature", env="TEMPERATURE", default=defaults.temperature,
                type=click.FloatRange(0, 5), help="0 is greedy (deterministic)."),
        _option("--top-p", env="TOP_P", default=defaults.top_p, type=click.FloatRange(0, 1),
                help="Nucleus sampling."),
        _option("--seed", env="SEED", default=None, type=click.IntRange(0, 2**32 - 1),
                help="Sampling seed [default: random]."),
        _option("--stop", env="STOP", multiple=True, show_default=False,
                help="Stop the answer at this text (repeatable; the variable splits on spaces)."),
        _option("--model", env="ASK_MODEL", default=None,
                help="Only workers serving this model [default: any]."),
    ]):
        f = decorator(f)
    return f


def _sampling(max_tokens: int, temperature: float, top_p: float, seed: int | None,
              stop: tuple[str, ...]) -> Sampling:
    return Sampling(temperature=temperature, top_p=top_p, seed=seed, max_tokens=max_tokens,
                    stop=tuple(stop))


@main.command()
@click.argument("prompt", required=False)
@_client_options
@_option("--session", env="SESSION", default=None,
         help="Conversation id: requests with the same one reuse a worker's KV cache.")
@_option("--system", env="SYSTEM", default=None, help="A system prompt.")
@_sampling_options
@timeout_option
@_option("--json", "as_json", env="JSON", is_flag=True,
         help="Print the answer and its usage as JSON.")
@_option("--stats", env="STATS", is_flag=True,
         help="Print worker, timings and cache use to stderr.")
def ask(prompt: str | None, client: ClientConfig, session: str | None, system: str | None,
        max_tokens: int, temperature: float, top_p: float, seed: int | None,
        stop: tuple[str, ...], model: str | None, timeout: float | None, as_json: bool,
        stats: bool) -> None:
    """Send one prompt and stream the answer. PROMPT '-' or none reads standard input.

    \b
    Example:
      pichat ask "What is a Raspberry Pi?" --max-tokens 100 --stats
    """
    from pichat.console import ask_once

    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise click.UsageError("the prompt is empty")
    try:
        asyncio.run(ask_once(
            client, prompt, system=system, session=session,
            sampling=_sampling(max_tokens, temperature, top_p, seed, stop), model=model,
            timeout=timeout, as_json=as_json, stats=stats))
    except PichatError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        sys.exit(130)


@main.command()
@_client_options
@_option("--session", env="SESSION", default=None, help="Resume this conversation id "
         "[default: a new one].")
@_option("--system", env="SYSTEM", default=None, help="A system prompt.")
@_sampling_options
@timeout_option
def chat(client: ClientConfig, session: str | None, system: str | None, max_tokens: int,
         temperature: float, top_p: float, seed: int | None, stop: tuple[str, ...],
         model: str | None, timeout: float | None) -> None:
    """Chat interactively; the whole conversation is one session, so each turn reuses the
    worker's KV cache. Commands: /new starts over, /quit leaves.

    \b
    Example:
      pichat chat --system "You are a terse assistant."
    """
    from pichat.console import chat_loop

    try:
        asyncio.run(chat_loop(
            client, session=session, system=system,
            sampling=_sampling(max_tokens, temperature, top_p, seed, stop), model=model,
            timeout=timeout))
    except PichatError as exc:
        _fail(exc)
    except (KeyboardInterrupt, EOFError):
        click.echo()


@main.command()
@_client_options
@_option("--json", "as_json", env="JSON", is_flag=True, help="Print the raw snapshot as JSON.")
def status(client: ClientConfig, as_json: bool) -> None:
    """Show the cluster: workers (model, slots busy/total, warm sessions, tokens/s) and
    the queue.

    \b
    Example:
      pichat status --router tcp://pi1:5555
    """
    from pichat.client import Client
    from pichat.console import format_status

    async def fetch() -> dict[str, Any]:
        async with Client(client) as connection:
            return await connection.status()

    try:
        snapshot = asyncio.run(fetch())
    except PichatError as exc:
        _fail(exc)
    click.echo(json.dumps(snapshot, indent=2) if as_json else format_status(snapshot))


@main.command()
@_option("--endpoint", env="HEALTH_BIND", default=DEFAULT_HEALTH_ENDPOINT,
         help="The daemon's --health-bind endpoint.")
@_option("--timeout", env="HEALTH_TIMEOUT", default=3.0, type=click.FloatRange(0.1),
         help="Seconds to wait for the answer.")
@_option("--json", "as_json", env="JSON", is_flag=True,
         help="Print the daemon's whole answer as JSON.")
def health(endpoint: str, timeout: float, as_json: bool) -> None:
    """Ask a router or worker on this machine whether it is healthy (exit 0) or not (1).

    A worker is healthy while it hears its router; a router while it serves. This is the
    Docker image's HEALTHCHECK.

    \b
    Example:
      pichat worker --health-bind ipc:///tmp/pichat-health.ipc &
      pichat health --endpoint ipc:///tmp/pichat-health.ipc
    """
    from pichat.health import probe

    try:
        answer = asyncio.run(probe(endpoint, timeout))
    except PichatError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)
    healthy = bool(answer.get("healthy"))
    if as_json:
        click.echo(json.dumps(answer))
    else:
        details = ", ".join(f"{k} {v}" for k, v in answer.items() if k not in ("healthy",))
        click.echo(f"{'healthy' if healthy else 'unhealthy'}: {details}")
    sys.exit(0 if healthy else 1)


@main.command(name="keygen")
@_option("--keys", env="KEYS", default=str(DEFAULT_KEYS_DIR),
         help="The keys directory to create or complete.")
@_option("--worker", "workers", env="KEYGEN_WORKERS", multiple=True, show_default=False,
         help="Also a key pair for a worker of this name, admitted by the router (repeatable).")
@_option("--client", "clients", env="KEYGEN_CLIENTS", multiple=True, show_default=False,
         help="Also a key pair for a client of this name, admitted by the router (repeatable).")
def keygen_command(keys: str, workers: tuple[str, ...], clients: tuple[str, ...]) -> None:
    """Create the CurveZMQ keys of a secured cluster (existing keys are kept): the router's,
    a worker's and a client's key pairs, the router's allow-lists, and an HTTP API key.

    \b
    Example:
      pichat keygen                          # ~/.config/pichat/keys
      pichat keygen --worker pi2 --worker pi3
    Then give every Pi the directory (the router needs router.key_secret and the
    allow-lists; a worker its key pair and router.key; a client likewise) and use --keys.
    """
    directory = Path(keys).expanduser()
    for name in (*workers, *clients):
        if not name.replace("-", "").replace("_", "").isalnum():
            raise click.BadParameter(f"{name!r}: use letters, digits, - and _")
    written = keygen(directory, workers=workers, clients=clients)
    for path in written:
        click.echo(f"wrote {path}")
    if not written:
        click.echo(f"{directory} already holds every key asked for")


# --- local cluster and models ---------------------------------------------------------


@main.command()
@_option("--workers", "n_workers", env="UP_WORKERS", default=2, type=click.IntRange(1, 64),
         help="Worker processes to start.")
@_option("--backend", env="BACKEND", default="llama", type=click.Choice(["llama", "sim"]),
         help="The workers' backend.")
@_option("--model", env="MODEL", default="default", help="A GGUF file or a known model name.")
@_option("--slots", env="SLOTS", default=1, type=click.IntRange(1, 64), help="Slots per worker.")
@_option("--threads", env="THREADS", default=None, type=click.IntRange(1),
         help="Threads per worker [default: CPUs / workers].")
@_option("--ctx", env="CTX", default=4096, type=click.IntRange(64), help="Context per slot.")
@_option("--policy", env="POLICY", default="affinity", type=click.Choice(POLICIES),
         help="The router's routing policy.")
@_option("--clients-bind", env="CLIENTS_BIND", default="tcp://127.0.0.1:5555",
         help="Where clients connect.")
@_option("--workers-bind", env="WORKERS_BIND", default="tcp://127.0.0.1:5556",
         help="Where workers connect.")
@_option("--http", env="HTTP", default="127.0.0.1:8080",
         help="The router's HTTP face (OpenAI API, chat page); 'off' disables it.")
@_option("--keys", env="KEYS", default=None, show_default=False,
         help="CurveZMQ keys for every link [default: ~/.config/pichat/keys, created if "
              "missing]; 'off' for none.")
@_option("--prompt", env="UP_PROMPT", default=None,
         help="Once the workers are up, ask this and print the answer.")
@_option("--once", env="UP_ONCE", is_flag=True, help="Stop the cluster after answering --prompt.")
@_option("--log-level", env="LOG_LEVEL", default="warning",
         type=click.Choice(["debug", "info", "warning", "error"]),
         help="How much the router and workers log.")
def up(n_workers: int, backend: str, model: str, slots: int, threads: int | None, ctx: int,
       policy: str, clients_bind: str, workers_bind: str, http: str, keys: str | None,
       prompt: str | None, once: bool, log_level: str) -> None:
    """Run a router and N workers on this machine. Ctrl-C stops them all.

    \b
    Example:
      pichat up --workers 2 --prompt "Hello, how are you?"
    """
    from pichat.cluster import ClusterConfig, run_cluster

    _setup_logging(log_level, "up")
    if keys is None:
        keygen(DEFAULT_KEYS_DIR.expanduser())
        keys = str(DEFAULT_KEYS_DIR.expanduser())
    resolved = keys_or_fail(keys)
    config = ClusterConfig(
        workers=n_workers, backend=backend, model=model, slots=slots,  # type: ignore[arg-type]
        threads=threads or max(1, (os.cpu_count() or 1) // n_workers), ctx=ctx,
        policy=policy, clients_bind=clients_bind, workers_bind=workers_bind,  # type: ignore[arg-type]
        http=http, log_level=log_level, keys=str(resolved.directory) if resolved else "off",
    )
    try:
        code = asyncio.run(run_cluster(
            config, prompt=prompt, once=once, say=lambda text: click.echo(text, err=True),
            write=lambda text: click.echo(text, nl=False)))
    except PichatError as exc:
        _fail(exc)
    sys.exit(code)


@main.command()
@click.argument("name", required=False)
def models(name: str | None) -> None:
    """List the models pichat can install by name, or install NAME now.

    \b
    Example:
      pichat models default     # assemble and verify the default model, print its path
    """
    from pichat.models import describe, resolve

    _setup_logging("info", "models")
    if name:
        try:
            path, _ = resolve(name)
        except PichatError as exc:
            _fail(exc)
        click.echo(path)
        return
    for m in describe():
        mark = "*" if m["default"] else " "
        state = "installed" if m["installed"] else "not installed"
        click.echo(f"{mark} {m['name']:32} {state:14} {m['description']}")
        click.echo(f"  {'':32} from {m['source']}")
