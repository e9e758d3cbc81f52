"""`pichat ask`, `chat` and `status`: the clients."""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from dataclasses import replace
from typing import Any

import click

from pichat.cli import options as o
from pichat.config import ClientConfig
from pichat.errors import PichatError
from pichat.protocol import Sampling

__all__ = ["ask", "chat", "status", "conversations"]


def _client_options(f: Any) -> Any:
    """--router, --keys, --key-name, gathered into one `client` ClientConfig argument."""

    @functools.wraps(f)
    def wrapper(*args: Any, router: str, keys: str | None, key_name: str, discovery: bool,
                **kwargs: Any) -> Any:
        resolved = o.keys_or_fail(keys)
        default = o.default(ClientConfig, "router")
        if discovery and router == default and resolved is not None:
            router = _located(o.joined_router(router, default, resolved, "clients"), resolved,
                              key_name)
        else:
            router = o.joined_router(router, default, resolved, "clients")
        config = ClientConfig(router=router, keys=resolved, key_name=key_name)
        return f(*args, client=config, **kwargs)

    for decorator in reversed([
        o.field(ClientConfig, "router", "--router", env="ROUTER",
                help="The router's client endpoint, or several separated by commas "
                     "(routers sharing one store): the first that answers is used."),
        o.keys,
        o.field(ClientConfig, "key_name", "--key-name", env="CLIENT_KEY_NAME",
                help="This client's key pair in the keys directory."),
        o.option("--discovery/--no-discovery", "discovery", env="DISCOVERY", default=True,
                 help="With no --router, if the router does not answer where it was, find "
                      "it on the LAN (mDNS; only a router with the key this host holds)."),
    ]):
        wrapper = decorator(wrapper)
    return wrapper


def _located(router: str, keys: Any, key_name: str) -> str:
    """A joined client's router (the router's secret is not here), looked for on the LAN
    when it does not answer where it was (its address changed)."""
    from pichat.discovery import answers, relocate

    if keys.on_routers_host() or answers(router):
        return router
    try:
        key = keys.router_public().decode()
    except PichatError:
        return router
    found = asyncio.run(relocate(keys.directory, key, "clients", router, keys=keys,
                                 key_name=key_name))
    if found and found != router:
        click.echo(f"(the router is now at {found})", err=True)
    return found or router


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
@o.option("--conversation", env="CONVERSATION", default=None,
          help="A conversation the router keeps (its id or title; a new one of that title "
               "if none): continue it from any machine with the keys.")
@_sampling_options
def chat(client: ClientConfig, **opts: Any) -> None:
    """Chat interactively; the whole conversation is one session, so each turn reuses the
    worker's KV cache. Commands: /new starts over, /quit leaves.

    \b
    Example:
      pichat chat --system "You are a terse assistant."
      pichat chat --conversation "trip planning"     # kept by the router
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
    the queue; given several routers, each of them too (which answers, which holds the
    floating address).

    \b
    Example:
      pichat status --router tcp://pi1:5555
      pichat status --router tcp://pi1:5555,tcp://pi2:5555
    """
    from pichat.client import Client
    from pichat.console import format_status

    async def one(endpoint: str) -> dict[str, Any]:
        try:
            async with Client(replace(client, router=endpoint,
                                      silence_timeout=min(client.silence, 3.0))) as c:
                snap = await c.status()
        except PichatError as exc:
            return {"endpoint": endpoint, "answering": False, "error": str(exc)[:200]}
        router = snap.get("router", {})
        return {"endpoint": endpoint, "answering": True, "up_s": router.get("up_s"),
                "workers": len(snap.get("workers", [])), "floating": router.get("floating")}

    async def fetch() -> dict[str, Any]:
        async with Client(client) as connection:
            snap = await connection.status()
        if len(client.routers) > 1:
            snap["routers"] = list(await asyncio.gather(*map(one, client.routers)))
        return snap

    try:
        snapshot = asyncio.run(fetch())
    except PichatError as exc:
        o.fail(exc)
    click.echo(json.dumps(snapshot, indent=2) if as_json else format_status(snapshot))


@click.group()
def conversations() -> None:
    """The conversations the router keeps for you (`pichat chat --conversation`): list,
    show, rename, delete, export. A conversation is named by its id or its title.

    \b
    Example:
      pichat conversations list
      pichat conversations export "trip planning" --format markdown > trip.md
    """


def _ask_router(client: ClientConfig, op: str, **fields: Any) -> Any:
    from pichat.client import Client

    async def run() -> Any:
        async with Client(client) as connection:
            return await connection.conversations(op, **fields)

    try:
        return asyncio.run(run())
    except PichatError as exc:
        o.fail(exc)


def _whole(client: ClientConfig, name: str) -> dict[str, Any]:
    """The conversation with all its messages (asked for page by page)."""
    from pichat.client import Client

    async def run() -> dict[str, Any]:
        async with Client(client) as connection:
            page = await connection.conversations("get", id=name, offset=0, limit=1000)
            messages = list(page["messages"])
            while page["messages"] and len(messages) < page["total"]:
                page = await connection.conversations("get", id=page["id"],
                                                      offset=len(messages), limit=1000)
                messages += page["messages"]
            return {**page, "offset": 0, "messages": messages}

    try:
        return asyncio.run(run())
    except PichatError as exc:
        o.fail(exc)


@conversations.command("list")
@_client_options
@o.option("--json", "as_json", env="JSON", is_flag=True, help="Print them as JSON.")
def list_conversations(client: ClientConfig, as_json: bool) -> None:
    """Your conversations, the most recently used first."""
    found = _ask_router(client, "list", limit=1000)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    if not found:
        click.echo("no stored conversations")
    for c in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(c["updated"]))
        click.echo(f"{c['id']}  {when}  {c['messages']:>4} messages  {c['title']}")


@conversations.command("show")
@click.argument("name")
@_client_options
def show_conversation(name: str, client: ClientConfig) -> None:
    """A conversation, message by message (and its memory of what slid out of context)."""
    click.echo(_markdown(_whole(client, name)))


@conversations.command("export")
@click.argument("name")
@_client_options
@o.option("--format", "fmt", env="FORMAT", type=click.Choice(["json", "markdown"]),
          default="json", help="JSON (everything stored) or Markdown (to read).")
def export_conversation(name: str, client: ClientConfig, fmt: str) -> None:
    """A whole conversation, to standard output."""
    whole = _whole(client, name)
    click.echo(json.dumps(whole, indent=2, ensure_ascii=False) if fmt == "json"
               else _markdown(whole))


@conversations.command("rename")
@click.argument("name")
@click.argument("title")
@_client_options
def rename_conversation(name: str, title: str, client: ClientConfig) -> None:
    """Give a conversation another title."""
    done = _ask_router(client, "rename", id=name, title=title)
    click.echo(f"{done['id']}: {done['title']}")


@conversations.command("delete")
@click.argument("name")
@_client_options
def delete_conversation(name: str, client: ClientConfig) -> None:
    """Delete a conversation for good."""
    done = _ask_router(client, "delete", id=name)
    click.echo(f"deleted {done['id']}")


def _markdown(c: dict[str, Any]) -> str:
    lines = [f"# {c['title'] or 'Untitled conversation'}", "",
             f"id {c['id']}, {c['total']} messages"
             + (f", model {c['model']}" if c.get("model") else ""), ""]
    if c.get("memory"):
        lines += [f"> Remembered of the first {c['remembered']} messages: {c['memory']}", ""]
    for m in c["messages"]:
        by = f" ({m['worker']})" if m.get("worker") else ""
        lines += [f"**{m['role']}**{by}:", "", m["content"], ""]
    return "\n".join(lines).rstrip() + "\n"
