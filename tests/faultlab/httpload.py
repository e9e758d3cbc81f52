"""The HA lab's HTTP clients: conversations through the OpenAI API at one address (the
floating one), each answer checked against what the simulated model must say. A request
whose connection fails or breaks mid-stream is sent again, as a client such as Open WebUI's
user pressing "regenerate" (or the `openai` package's retries) would: counted as retried,
and lost only if no try answered within a minute.

A prober beside them sends a new one-token request every 0.25 s on a new connection, each
given 5 s: when new requests are answered again after a fault.

Writes OUT.ready once every client has had an answer (the load is under way), and ends at
--duration or once --stop-file exists. Writes JSON: {"counts": {...}, "answers": [[start,
answered try's start, end, ok], ...], "errors": {...}, "failures": [[time, error], ...],
"probes": [[sent, answered], ...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).parent))
from load import expected  # noqa: E402

from pichat.protocol import ChatMessage  # noqa: E402


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--duration", type=float, default=14.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--out", required=True)
    parser.add_argument("--api-key-file", required=True)
    parser.add_argument("--stop-file", type=Path,
                        help="end (before --duration) once this file exists")
    args = parser.parse_args()
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    answers: list[tuple[float, float, float, bool]] = []
    failures: list[tuple[float, str]] = []
    key = next(line.strip() for line in Path(args.api_key_file).read_text().splitlines()
               if line.strip() and not line.startswith("#"))
    stop_at = time.monotonic() + args.duration
    answered: set[int] = set()
    """The clients that have had an answer (all of them: OUT.ready is written)."""

    def going() -> bool:
        return time.monotonic() < stop_at and not (args.stop_file and args.stop_file.exists())
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=1.0, sock_read=10.0)

    async def ask(session: aiohttp.ClientSession, messages: list[ChatMessage]) -> str:
        body = {"model": "sim", "stream": True, "temperature": 0, "max_tokens": 100,
                "messages": [{"role": m.role, "content": m.content} for m in messages]}
        text = []
        async with session.post(args.url + "/v1/chat/completions", json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:80]}")
            done = False
            async for line in resp.content:
                line = line.strip()
                if line == b"data: [DONE]":
                    done = True
                elif line.startswith(b"data: "):
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", ()):
                        text.append(choice.get("delta", {}).get("content") or "")
            if not done:
                raise ConnectionError("the stream ended without [DONE]")
        return "".join(text)

    async def loop(i: int) -> None:
        history: list[ChatMessage] = []
        n = 0
        async with aiohttp.ClientSession(
                timeout=timeout, headers={"Authorization": f"Bearer {key}"}) as session:
            while going():
                n += 1
                if len(history) >= 8:
                    history = []
                messages = [*history, ChatMessage("user", f"http question {i} {n}")]
                counts["sent"] += 1
                start = time.time()
                give_up = time.monotonic() + 60
                tries = 0
                while True:
                    tries += 1
                    began = time.time()
                    try:
                        text = await ask(session, messages)
                        break
                    except (aiohttp.ClientError, ConnectionError, TimeoutError,
                            RuntimeError, ValueError) as exc:
                        errors[f"{type(exc).__name__}: {str(exc)[:60]}"] += 1
                        failures.append((time.time(), f"{i}: {type(exc).__name__}"))
                        if time.monotonic() > give_up:
                            text = None
                            break
                        await asyncio.sleep(0.2)
                if text is None:
                    counts["lost"] += 1
                    continue
                counts["retried"] += tries > 1
                ok = text == expected(messages)
                counts["completed" if ok else "corrupted"] += 1
                answers.append((start, began, time.time(), ok))
                answered.add(i)
                if len(answered) == args.concurrency:
                    Path(args.out + ".ready").touch()
                history = [*messages, ChatMessage("assistant", text)]

    probes: list[tuple[float, float]] = []

    async def probe() -> None:
        body = {"model": "sim", "max_tokens": 1, "temperature": 0,
                "messages": [{"role": "user", "content": "probe"}]}
        while going():
            sent = time.time()

            async def one(sent: float = sent) -> None:
                try:
                    async with aiohttp.ClientSession(
                            timeout=aiohttp.ClientTimeout(total=5.0),
                            connector=aiohttp.TCPConnector(force_close=True),
                            headers={"Authorization": f"Bearer {key}"}) as session, \
                            session.post(args.url + "/v1/chat/completions",
                                         json=body) as resp:
                        if resp.status == 200 and (await resp.json())["choices"]:
                            probes.append((sent, time.time()))
                except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                    pass

            tasks.add(asyncio.create_task(one()))
            await asyncio.sleep(0.25)

    tasks: set[asyncio.Task] = set()
    await asyncio.gather(probe(), *[loop(i) for i in range(args.concurrency)])
    await asyncio.gather(*tasks)
    Path(args.out).write_text(json.dumps({
        "counts": {k: counts[k] for k in ("sent", "completed", "retried", "lost",
                                           "corrupted")},
        "answers": answers, "errors": dict(errors), "failures": failures,
        "probes": probes}))


if __name__ == "__main__":
    asyncio.run(main())
