"""What every `pichat` command shares: options that read PICHAT_* variables and take their
defaults from the config dataclasses (one place states a default), and turning options
into a config object."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any, NoReturn

import click

from pichat.config import RouterConfig, WorkerConfig
from pichat.config import default_of as default
from pichat.errors import PichatError
from pichat.invites import stored_router
from pichat.logs import OneLine
from pichat.security import Keys, resolve_keys

__all__ = ["option", "field", "default", "build", "setup_logging", "fail", "keys_or_fail",
           "joined_router",
           "log_level", "max_message_bytes", "heartbeat", "liveness", "health_bind", "keys"]


def option(*names: str, env: str, **kwargs: Any) -> Any:
    """A click option also read from the environment variable PICHAT_`env`."""
    kwargs.setdefault("show_default", True)
    return click.option(*names, envvar=f"PICHAT_{env}", show_envvar=True, **kwargs)


def field(config: type, name: str, flag: str, *, env: str, **kwargs: Any) -> Any:
    """An option for the field `name` of `config`: its default is the field's."""
    return option(flag, name, env=env, default=default(config, name), **kwargs)


def build(config: type, values: dict[str, Any], **overrides: Any) -> Any:
    """`config` filled from the options named like its fields, and `overrides`."""
    names = {f.name for f in dataclasses.fields(config)}
    return config(**{k: v for k, v in values.items() if k in names and k not in overrides},
                  **overrides)


def setup_logging(level: str, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine(f"%(asctime)s %(levelname).1s [{role}] %(name)s: %(message)s",
                                 datefmt="%H:%M:%S"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def fail(exc: Exception) -> NoReturn:
    click.secho(f"error: {exc}", fg="red", err=True)
    sys.exit(1)


def joined_router(router: str, default_router: str, keys: Keys | None, role: str) -> str:
    """`router`, or, left at its default, the endpoint a `pichat join` stored in the keys
    directory (router.json) for `role` ("workers" or "clients")."""
    if router != default_router or keys is None:
        return router
    try:
        return stored_router(keys.directory, role) or router
    except PichatError as exc:
        fail(exc)


def keys_or_fail(value: str | None) -> Keys | None:
    try:
        return resolve_keys(value)
    except PichatError as exc:
        fail(exc)


log_level = option("--log-level", env="LOG_LEVEL", default="info",
                   type=click.Choice(["debug", "info", "warning", "error"]),
                   help="How much the daemon logs.")
max_message_bytes = field(RouterConfig, "max_message_bytes", "--max-message-bytes",
                          env="MAX_MESSAGE_BYTES", type=click.IntRange(1024),
                          help="Largest message accepted on any socket; bigger ones drop the "
                               "connection.")
heartbeat = field(RouterConfig, "heartbeat_interval", "--heartbeat", env="HEARTBEAT",
                  type=click.FloatRange(0.05), help="Seconds between heartbeats.")
liveness = field(WorkerConfig, "liveness", "--liveness", env="LIVENESS", type=click.IntRange(1),
                 help="Missed heartbeats after which the peer counts as dead.")
health_bind = field(RouterConfig, "health_bind", "--health-bind", env="HEALTH_BIND",
                    show_default=False,
                    help="Answer `pichat health` on this endpoint, e.g. "
                         "ipc:///tmp/pichat-health.ipc [default: off].")
keys = option("--keys", env="KEYS", default=None, show_default=False,
              help="CurveZMQ keys directory (`pichat keygen`) [default: ~/.config/pichat/keys "
                   "if it exists]; 'off' for none.")
