"""What the client commands print: streamed answers, the chat loop, the status table."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from pichat.client import Client, Reply, new_id
from pichat.config import ClientConfig
from pichat.errors import ErrorCode, PichatError
from pichat.protocol import ChatMessage, Sampling

__all__ = ["ask_once", "chat_loop", "format_status", "format_stats"]


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def format_stats(reply: Reply) -> str:
    u = reply.usage
    rate = f", {u.tokens_per_s:.1f} tok/s" if u.tokens_per_s else ""
    moved = f", {reply.done.failovers} failover" if reply.done.failovers else ""
    return (f"[{reply.worker}: TTFT {reply.ttft * 1000:.0f} ms, {u.completion_tokens} tokens"
            f"{rate}, prompt {u.prompt_tokens} ({u.cached_tokens} cached), {reply.finish}"
            f"{moved}]")


async def ask_once(config: ClientConfig, prompt: str, *, system: str | None,
                   session: str | None, sampling: Sampling, model: str | None,
                   timeout: float | None, as_json: bool, stats: bool) -> None:
    messages = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", prompt)]
    async with Client(config) as client:
        reply = await client.chat(messages, session=session, sampling=sampling, model=model,
                                  timeout=timeout, on_text=None if as_json else _write)
    if as_json:
        print(json.dumps({
            "id": reply.id, "text": reply.text, "worker": reply.worker, "finish": reply.finish,
            "ttft_ms": round(reply.ttft * 1000, 1), "usage": {
                "prompt_tokens": reply.usage.prompt_tokens,
                "cached_tokens": reply.usage.cached_tokens,
                "completion_tokens": reply.usage.completion_tokens,
                "prompt_ms": reply.usage.prompt_ms,
                "generate_ms": reply.usage.generate_ms,
            },
        }))
        return
    _write("\n")
    if stats:
        print(format_stats(reply), file=sys.stderr)


async def chat_loop(config: ClientConfig, *, session: str | None, system: str | None,
                    sampling: Sampling, model: str | None, timeout: float | None,
                    conversation: str | None = None) -> None:
    if conversation:
        await _stored_chat(config, conversation, system=system, sampling=sampling,
                           model=model, timeout=timeout)
        return
    loop = asyncio.get_running_loop()
    session = session or new_id()
    history: list[ChatMessage] = [ChatMessage("system", system)] if system else []
    print(f"pichat chat, session {session}. /new starts over, /quit leaves.", file=sys.stderr)
    async with Client(config) as client:
        while True:
            line = await loop.run_in_executor(None, _read_line)
            if line is None or line.strip() == "/quit":
                return
            if line.strip() == "/new":
                session = new_id()
                history = history[:1] if system else []
                print(f"(new conversation, session {session})", file=sys.stderr)
                continue
            if not line.strip():
                continue
            history.append(ChatMessage("user", line))
            try:
                reply = await client.chat(history, session=session, sampling=sampling,
                                          model=model, timeout=timeout, on_text=_write)
            except PichatError as exc:
                history.pop()
                print(f"\n(error: {exc})", file=sys.stderr)
                continue
            _write("\n")
            print(format_stats(reply), file=sys.stderr)
            history.append(ChatMessage("assistant", reply.text))


async def _stored_chat(config: ClientConfig, name: str, *, system: str | None,
                       sampling: Sampling, model: str | None, timeout: float | None) -> None:
    """A conversation the router keeps: only each new line is sent."""
    loop = asyncio.get_running_loop()
    async with Client(config) as client:
        try:
            stored = await client.conversations("get", id=name, offset=0, limit=1000)
        except PichatError as exc:
            if getattr(exc, "code", None) != ErrorCode.BAD_REQUEST:
                raise
            stored = None
        if stored:
            total = stored["total"]
            print(f"pichat chat, conversation {stored['id']} ({stored['title'] or 'untitled'}"
                  f", {total} messages). /quit leaves.", file=sys.stderr)
            for m in stored["messages"][-6:]:
                if m["role"] in ("user", "assistant"):
                    print(("> " if m["role"] == "user" else "") + m["content"], file=sys.stderr)
        else:
            print(f"pichat chat, a new conversation {name!r}. /quit leaves.", file=sys.stderr)
        first = not stored or not stored["total"]
        while True:
            line = await loop.run_in_executor(None, _read_line)
            if line is None or line.strip() == "/quit":
                return
            if not line.strip():
                continue
            new = [ChatMessage("user", line)]
            if first and system:
                new.insert(0, ChatMessage("system", system))
            try:
                reply = await client.chat(new, sampling=sampling, model=model,
                                          timeout=timeout, on_text=_write,
                                          conversation=name)
            except PichatError as exc:
                print(f"\n(error: {exc})", file=sys.stderr)
                continue
            first = False
            name = reply.done.conversation or name  # its id from now on
            _write("\n")
            print(format_stats(reply), file=sys.stderr)


def _read_line() -> str | None:
    try:
        return input("> ")
    except EOFError:
        return None


def _clock(t: float) -> str:
    return time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(t))


def _failover(floating: dict[str, Any]) -> str:
    """", last failover ..." of a router that took the address from another, or ""."""
    last = floating.get("last_failover")
    if not last:
        return ""
    return (f", last failover {_clock(last['at'])} from {last['from']} "
            f"({last['seconds']:.1f}s with no holder)")


def _floating(floating: dict[str, Any]) -> str:
    since = floating.get("since")
    when = f" since {_clock(since)}" if since else ""
    held = "holds" if floating.get("held") else "does not hold"
    return (f"floating address {floating.get('address')}: this router {held} it{when} "
            f"(taken {floating.get('acquired', 0)} times{_failover(floating)})")


def _routers(routers: list[dict[str, Any]]) -> list[str]:
    """The lines of `pichat status --router A,B`: each router, answering or not."""
    if not routers:
        return []
    lines = ["routers:"]
    for r in routers:
        if not r.get("answering"):
            lines.append(f"  {r['endpoint']}  not answering ({r.get('error', '')})")
            continue
        floating = r.get("floating") or {}
        mark = (f", holds {floating['address']} since {_clock(floating['since'])}"
                f"{_failover(floating)}" if floating.get("held") and floating.get("since")
                else "")
        lines.append(f"  {r['endpoint']}  up {r.get('up_s') or 0:.0f}s, "
                     f"{r.get('workers', 0)} workers{mark}")
    return lines


def format_status(snapshot: dict[str, Any]) -> str:
    router = snapshot.get("router", {})
    queue = snapshot.get("queue", {})
    requests = snapshot.get("requests", {})
    workers = snapshot.get("workers", [])
    lines = [
        f"router {router.get('version', '?')} on {router.get('clients', '?')}, "
        f"policy {router.get('policy', '?')}, up {router.get('up_s', 0):.0f}s"
        + (f", {rss:.0f} MB" if (rss := router.get("memory", {}).get("rss_mb")) else ""),
        f"queue {queue.get('depth', 0)}/{queue.get('limit', 0)}, "
        f"active {requests.get('active', 0)}, completed {requests.get('completed', 0)}, "
        f"cache hit {requests.get('cache_hit_share', 0.0) * 100:.0f}% of prompt tokens",
        *([_floating(router["floating"])] if router.get("floating") else []),
        *_routers(snapshot.get("routers", [])),
        "",
    ]
    if not workers:
        lines.append("no workers connected")
        return "\n".join(lines)
    header = ("worker", "model", "backend", "slots", "warm", "kv tokens", "kv MB", "store MB",
              "tok/s", "served", "restarts", "seen")
    rows = [header] + [
        (
            w["name"],
            w["model"],
            w["backend"] + (" (simulated)" if w["backend"] == "sim" else ""),
            f"{w['busy']}/{w['slots']}",
            str(w["warm_sessions"]),
            *_memory_cells(w.get("memory", {})),
            f"{w['tokens_per_s']:.1f}",
            str(w["served"]),
            str(w.get("restarts", 0)),
            f"{w['last_seen_s']:.1f}s ago",
        )
        for w in workers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
              for row in rows]
    if any(w["backend"] == "sim" for w in workers):
        lines += ["", "sim workers are a test instrument: they simulate a model's timing "
                      "and caching, and answer with filler text."]
    return "\n".join(lines)


def _memory_cells(m: dict[str, Any]) -> tuple[str, str, str]:
    """A worker's KV use (tokens held/room) and the RAM of its KV cache and store."""
    if not m.get("kv_tokens"):
        return "?", "?", "?"
    return (f"{m['kv_used_tokens']}/{m['kv_tokens']}", f"{m['kv_mb']:.0f} {m['kv_type']}",
            f"{m['store_mb']:.0f}/{m['store_budget_mb']:.0f}")
