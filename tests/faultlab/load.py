"""The fault lab's client host: concurrent streaming requests, each checked against the
answer the simulated model must give, and a watch on the router's view of the workers.

Writes JSON: {"counts": {...}, "timeline": [[unix time, [worker names], router start,
router RSS MB, router loop lag ms], ...]}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pichat.client import Client  # noqa: E402
from pichat.config import ClientConfig, SimConfig  # noqa: E402
from pichat.errors import PichatError, ProtocolError  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402
from pichat.security import resolve_keys  # noqa: E402
from pichat.worker.engine.sim import SimModel  # noqa: E402
from pichat.worker.engine.textstream import TextStream  # noqa: E402

SAMPLING = Sampling(temperature=0, max_tokens=100)
EXPECTED_MODEL = SimModel(SimConfig(prompt_tps=1e9, gen_tps=1e9, reply_tokens=40), 4096)


def expected(messages: list[ChatMessage]) -> str:
    out = TextStream(lambda *_: None)
    EXPECTED_MODEL.new_context(1).generate(EXPECTED_MODEL.chat_tokens(messages), SAMPLING, out,
                                           threading.Event())
    out.close()
    return out.text


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--router", required=True)
    parser.add_argument("--duration", type=float, default=14.0)
    parser.add_argument("--concurrency", type=int, default=12)
    parser.add_argument("--workers", default="w1,w2,w3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--keys", default="off")
    parser.add_argument("--stop-file", type=Path,
                        help="end (before --duration) once this file exists")
    parser.add_argument("--conversations", action="store_true",
                        help="each client holds conversations of up to 6 turns (sessions) and "
                             "counts the later turns that found their history cached")
    parser.add_argument("--stored", action="store_true",
                        help="each client holds stored conversations (kept by the router) of "
                             "up to 6 turns, retries a turn it is told was not kept, checks "
                             "every answer against the history it was told was kept, and "
                             "reads every conversation back at the end")
    args = parser.parse_args()
    keys = resolve_keys(args.keys)
    want = set(args.workers.split(","))
    counts: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    timeline: list[tuple[float, list[str], int | None, float | None, float | None]] = []

    async with Client(ClientConfig(router=args.router, silence_timeout=1.5,
                                   keys=keys)) as watch:
        await watch.wait_for_workers(names=want)
        Path(args.out + ".ready").touch()
        stop_at = time.monotonic() + args.duration

        def going() -> bool:
            return time.monotonic() < stop_at and not (args.stop_file and
                                                       args.stop_file.exists())

        async def watcher() -> None:
            while True:
                try:
                    status = await watch.status()
                    names = sorted(w["name"] for w in status["workers"])
                    router = status["router"]
                    started = round(time.time() - router["up_s"])
                    rss, lag = router["memory"]["rss_mb"], router["loop_lag_ms"]["max_1m"]
                except PichatError:
                    names, started, rss, lag = [], None, None, None
                timeline.append((time.time(), names, started, rss, lag))
                await asyncio.sleep(0.1)

        async with Client(ClientConfig(router=args.router, silence_timeout=3.0,
                                       keys=keys)) as client:
            async def loop(i: int) -> None:
                n = conversation = 0
                history: list[ChatMessage] = []
                held = 0  # tokens of the history a warm worker holds
                while going():
                    n += 1
                    if not args.conversations or len(history) >= 12:  # 6 turns, then anew
                        history, held, conversation = [], 0, n
                    question = ChatMessage("user", f"question {i} {n} from the fault lab")
                    messages = [*history, question]
                    session = f"c{i}-{conversation}" if args.conversations else None
                    counts["sent"] += 1
                    try:
                        reply = await asyncio.wait_for(
                            client.chat(messages, sampling=SAMPLING, session=session), 90)
                    except TimeoutError:
                        counts["lost"] += 1
                        continue
                    except ProtocolError as exc:  # e.g. a gap in the chunk numbering
                        counts["corrupted"] += 1
                        errors[str(exc)[:80]] += 1
                        continue
                    except PichatError as exc:
                        counts["failed"] += 1
                        errors[f"{exc.code.value}: {str(exc)[:60]}"] += 1
                        continue
                    if reply.text == expected(messages):
                        counts["completed"] += 1
                    else:
                        counts["corrupted"] += 1
                    counts["failovers"] += reply.done.failovers
                    if args.conversations:
                        usage = reply.usage
                        if held:
                            counts["later_turns"] += 1
                            counts["warm_turns"] += usage.cached_tokens >= held
                        held = usage.prompt_tokens + usage.completion_tokens
                        history = [*messages, ChatMessage("assistant", reply.text)]

            run = secrets.token_hex(4)  # this load's titles (others may share the owner)
            kept: dict[str, list[ChatMessage]] = {}
            """Per stored conversation's id, the history its client was told was kept."""

            async def stored(i: int) -> None:
                n = 0
                while going():
                    title, history, cid = f"{run}-{i}-{n}", [], None
                    for turn in range(6):
                        if not going():
                            break
                        question = ChatMessage("user", f"stored {i} {n} {turn}")
                        counts["sent"] += 1
                        for _ in range(40):  # told "not kept" or refused: ask again
                            try:
                                reply = await asyncio.wait_for(client.chat(
                                    [question], sampling=SAMPLING, conversation=cid or title),
                                    90)
                                break
                            except TimeoutError:
                                counts["lost"] += 1
                                errors[f"lost: {title} turn {turn}"] += 1
                                return
                            except PichatError as exc:
                                counts["retried"] += 1
                                errors[f"{exc.code.value}: {str(exc)[:60]}"] += 1
                                await asyncio.sleep(0.2)
                        else:
                            counts["failed"] += 1
                            errors[f"failed: {title} turn {turn}"] += 1
                            return
                        ok = reply.text == expected([*history, question])
                        counts["completed" if ok else "corrupted"] += 1
                        if not ok:
                            errors[f"wrong: {title} turn {turn} via {client.endpoint}"] += 1
                        history += [question, ChatMessage("assistant", reply.text)]
                        cid = reply.done.conversation
                        kept[cid] = list(history)
                    n += 1

            watching = asyncio.create_task(watcher())
            await asyncio.gather(*[stored(i) if args.stored else loop(i)
                                   for i in range(args.concurrency)])
            watching.cancel()
            for cid, history in kept.items():  # what the store holds is what was told kept
                try:
                    got = await client.conversations("get", id=cid)
                    same = [(m["role"], m["content"]) for m in got["messages"]] == [
                        (m.role, m.content) for m in history]
                except PichatError as exc:
                    errors[f"readback: {str(exc)[:60]}"] += 1
                    same = False
                counts["conversations"] += 1
                counts["diverged"] += not same
    kinds = ("sent", "completed", "failed", "lost", "corrupted", "failovers", "later_turns",
             "warm_turns") + (("retried", "conversations", "diverged") if args.stored else ())
    result = {"counts": {k: counts[k] for k in kinds}
              | {"errors": dict(errors)},
              "timeline": timeline}
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
