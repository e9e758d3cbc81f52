"""`pichat up`, `health`, `keygen` and `models`: a local cluster, and the tools around it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from pichat.cli import options as o
from pichat.cli.daemons import model_options
from pichat.config import DEFAULT_HEALTH_ENDPOINT
from pichat.errors import PichatError
from pichat.router.policy.scheduler import POLICIES
from pichat.security import DEFAULT_KEYS_DIR, keygen

__all__ = ["up", "health", "keygen_command", "models"]


def _cluster_config() -> type:
    from pichat.cluster import ClusterConfig

    return ClusterConfig


@click.command()
@o.option("--workers", "workers", env="UP_WORKERS", default=2, type=click.IntRange(1, 64),
          help="Worker processes to start.")
@model_options
@o.option("--threads", env="THREADS", default=None, type=click.IntRange(1),
          help="Threads per worker [default: CPUs / workers].")
@o.option("--policy", env="POLICY", default="affinity", type=click.Choice(POLICIES),
          help="The router's routing policy.")
@o.option("--clients-bind", env="CLIENTS_BIND", default="tcp://127.0.0.1:5555",
          help="Where clients connect.")
@o.option("--workers-bind", env="WORKERS_BIND", default="tcp://127.0.0.1:5556",
          help="Where workers connect.")
@o.option("--http", env="HTTP", default="127.0.0.1:8080",
          help="The router's HTTP face (OpenAI API, chat page); 'off' disables it.")
@o.option("--keys", env="KEYS", default=None, show_default=False,
          help="CurveZMQ keys for every link [default: ~/.config/pichat/keys, created if "
               "missing]; 'off' for none.")
@o.option("--prompt", env="UP_PROMPT", default=None,
          help="Once the workers are up, ask this and print the answer.")
@o.option("--once", env="UP_ONCE", is_flag=True,
          help="Stop the cluster after answering --prompt.")
@o.option("--log-level", env="LOG_LEVEL", default="warning",
          type=click.Choice(["debug", "info", "warning", "error"]),
          help="How much the router and workers log.")
def up(prompt: str | None, once: bool, keys: str | None, threads: int | None,
       **opts: Any) -> None:
    """Run a router and N workers on this machine; a child that dies is started again.
    Ctrl-C stops them all.

    \b
    Example:
      pichat up --workers 2 --prompt "Hello, how are you?"
    """
    from pichat.cluster import run_cluster

    o.setup_logging(opts["log_level"], "up")
    if keys is None:
        keygen(DEFAULT_KEYS_DIR.expanduser())
        keys = str(DEFAULT_KEYS_DIR.expanduser())
    resolved = o.keys_or_fail(keys)
    config = o.build(_cluster_config(), opts,
                     threads=threads or max(1, (os.cpu_count() or 1) // opts["workers"]),
                     keys=str(resolved.directory) if resolved else "off")
    try:
        code = asyncio.run(run_cluster(
            config, prompt=prompt, once=once, say=lambda text: click.echo(text, err=True),
            write=lambda text: click.echo(text, nl=False)))
    except PichatError as exc:
        o.fail(exc)
    sys.exit(code)


@click.command()
@o.option("--endpoint", env="HEALTH_BIND", default=DEFAULT_HEALTH_ENDPOINT,
          help="The daemon's --health-bind endpoint.")
@o.option("--timeout", env="HEALTH_TIMEOUT", default=3.0, type=click.FloatRange(0.1),
          help="Seconds to wait for the answer.")
@o.option("--json", "as_json", env="JSON", is_flag=True,
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


@click.command(name="keygen")
@o.option("--keys", env="KEYS", default=str(DEFAULT_KEYS_DIR),
          help="The keys directory to create or complete.")
@o.option("--worker", "workers", env="KEYGEN_WORKERS", multiple=True, show_default=False,
          help="Also a key pair for a worker of this name, admitted by the router "
               "(repeatable).")
@o.option("--client", "clients", env="KEYGEN_CLIENTS", multiple=True, show_default=False,
          help="Also a key pair for a client of this name, admitted by the router "
               "(repeatable).")
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


@click.command()
@click.argument("name", required=False)
def models(name: str | None) -> None:
    """List the models pichat can install by name, or install NAME now.

    \b
    Example:
      pichat models default     # assemble and verify the default model, print its path
    """
    from pichat.models import describe, resolve

    o.setup_logging("info", "models")
    if name:
        try:
            path, _ = resolve(name)
        except PichatError as exc:
            o.fail(exc)
        click.echo(path)
        return
    for m in describe():
        mark = "*" if m["default"] else " "
        state = "installed" if m["installed"] else "not installed"
        click.echo(f"{mark} {m['name']:32} {state:14} {m['description']}")
        click.echo(f"  {'':32} from {m['source']}")
