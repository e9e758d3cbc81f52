"""`pichat ask`, `chat` and `status`: the clients."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from typing import Any

import click

from pichat.cli import options as o
from pichat.config import ClientConfig
from pichat.errors import PichatError
from pichat.protocol import Sampling

__all__ = ["ask", "chat", "status"]


def _client_options(f: Any) -> Any:
    """--router, --keys, --key-name, gathered into one `client` ClientConfig argument."""

    @functools.wraps(f)
    def wrapper(*args: Any, router: str, keys: str | None, key_name: str, **kwargs: Any) -> Any:
        config = ClientConfig(router=router, keys=o.keys_or_fail(keys), key_name=key_name)
        return f(*args, client=config, **kwargs)

    for decorator in reversed([
        o.field(ClientConfig, "router", "--router", env="ROUTER",
                help="The router's client endpoint."),
        o.keys,
        o.field(ClientConfig, "key_name", "--key-name", env="CLIENT_KEY_NAME",
                help="This client's key pair in the keys directory."),
    ]):
        wrapper = decorator(wrapper)
    return wrapper


def _sampling_options(f: Any) -> Any:
    """The sampling options, gathered into one `sampling` argument; and --model."""

    @functools.wraps(f)
    def wrapper(*args: Any, stop: tuple[str, ...], **kwargs: Any) -> Any:
        sampling = o.build(Sampling, kwargs, stop=tuple(stop))
        rest = {k: v for k, v in kwargs.items() if k not in ("max_tokens", "temperature",
                                                               "top_p", "seed")}
        return f(*args, sampling=sampling, **rest)

    for decorator in reversed([
        o.field(Sampling, "max_tokens", "--max-tokens", env="MAX_TOKENS",
                type=click.IntRange(1), help="Longest answer, in tokens."),
        o.field(Sampling, "temperature", "--temperature", env="TEMPERATURE",
                type=click.FloatRange(0, 5), help="0 is greedy (deterministic)."),
        o.field(Sampling, "top_p", "--top-p", env="TOP_P", type=click.FloatRange(0, 1),
                help="Nucleus sampling."),
        o.field(Sampling, "seed", "--seed", env="SEED", type=click.IntRange(0, 2**32 - 1),
                help="Sampling seed [default: random]."),
        o.option("--stop", env="STOP", multiple=True, show_default=False,
                 help="Stop the answer at this text (repeatable; the variable splits on "
                      "spaces)."),
        o.option("--model", env="ASK_MODEL", default=None,
                 help="Only workers serving this model [default: any]."),
        o.option("--timeout", env="TIMEOUT", default=None, type=click.FloatRange(0.001),
                 help="Seconds to wait for a whole answer [default: the router's]."),
        o.option("--system", env="SYSTEM", default=None, help="A system prompt."),
    ]):
        wrapper = decorator(wrapper)
    return wrapper


@click.command()
@click.argument("prompt", required=False)
@_client_options
@o.option("--session", env="SESSION", default=None,
          help="Conversation id: requests with the same one reuse a worker's KV cache.")
@_sampling_options
@o.option("--json", "as_json", env="JSON", is_flag=True,
          help="Print the answer and its usage as JSON.")
@o.option("--stats", env="STATS", is_flag=True,
          help="Print worker, timings and cache use to stderr.")
def ask(prompt: str | None, client: ClientConfig, **opts: Any) -> None:
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
        asyncio.run(ask_once(client, prompt, **opts))
    except PichatError as exc:
        o.fail(exc)
    except KeyboardInterrupt:
        sys.exit(130)


@click.command()
@_client_options
@o.option("--session", env="SESSION", default=None,
          help="Resume this conversation id [default: a new one].")
@_sampling_options
def chat(client: ClientConfig, **opts: Any) -> None:
    """Chat interactively; the whole conversation is one session, so each turn reuses the
    worker's KV cache. Commands: /new starts over, /quit leaves.

    \b
    Example:
      pichat chat --system "You are a terse assistant."
    """
    from pichat.console import chat_loop

    try:
        asyncio.run(chat_loop(client, **opts))
    except PichatError as exc:
        o.fail(exc)
    except (KeyboardInterrupt, EOFError):
        click.echo()


@click.command()
@_client_options
@o.option("--json", "as_json", env="JSON", is_flag=True, help="Print the raw snapshot as JSON.")
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
        o.fail(exc)
    click.echo(json.dumps(snapshot, indent=2) if as_json else format_status(snapshot))
