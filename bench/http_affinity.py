"""Stateless clients over the HTTP API: prefix affinity vs round-robin.

Many conversations share one system prompt and talk through the OpenAI-compatible API
with the official `openai` client, which sends the whole history every turn and no
session id. With the affinity policy the router recognises each conversation from its
history and keeps it on the worker holding its KV cache, while the shared system prompt
does not pile every conversation onto one worker (bounded load). We measure TTFT per
turn (streaming, client side), the share of prompt tokens served from cache, and how
the turns spread over the workers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import Counter, defaultdict

sys.path.insert(0, os.path.dirname(__file__))
import openai  # noqa: E402

from common import local_cluster, ms, p50  # noqa: E402

SYSTEM = (
    "You are the assistant of a public library. Answer in two or three short sentences. "
    "Be friendly and concrete; when you do not know, say so and suggest asking a librarian. "
    "The library opens at nine and closes at six, Monday to Saturday. Members may borrow "
    "ten books for three weeks and renew them twice, online or at the desk."
)
OPENERS = ["Can I borrow a book today?", "How long can I keep a book?",
           "Do you have books about Raspberry Pi?", "Are you open on Sunday?",
           "How do I renew a book?", "Can children get a card?", "Is there wifi?",
           "Can I print here?", "Do you lend e-books?", "Where are the maps?"]
FOLLOW_UPS = ["Thanks. And what if I am late?", "Can I do that online?",
              "What do I need to bring?", "Is it free?", "Thank you, one last thing: parking?"]


async def conversation(api, cid: int, turns: int, max_tokens: int, think: float, out) -> None:
    rng = random.Random(cid)
    history = [{"role": "system", "content": SYSTEM},
               {"role": "user", "content": OPENERS[cid % len(OPENERS)]}]
    for turn in range(turns):
        await asyncio.sleep(rng.uniform(0, think))
        start = time.perf_counter()
        first, text, usage, worker = None, [], None, None
        stream = await api.chat.completions.create(
            model="pichat", messages=history, temperature=0, max_tokens=max_tokens,
            stream=True, stream_options={"include_usage": True})
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            extra = chunk.model_extra or {}
            if "pichat" in extra:
                worker = extra["pichat"]["worker"]
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter()
                text.append(chunk.choices[0].delta.content)
        out[turn].append((first - start, usage, worker, cid))
        history += [{"role": "assistant", "content": "".join(text)},
                    {"role": "user", "content": FOLLOW_UPS[(turn + cid) % len(FOLLOW_UPS)]}]


async def run_policy(policy: str, args) -> tuple[dict, float]:
    results: dict[int, list] = defaultdict(list)
    async with local_cluster(workers=2, backend="llama", model=args.model, slots=args.slots,
                             threads=1, policy=policy, http="127.0.0.1:0") as client:
        base = (await client.status())["router"]["http"]
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="none",
                                      max_retries=0, timeout=600) as api:
            start = time.perf_counter()
            await asyncio.gather(*[conversation(api, c, args.turns, args.max_tokens, args.think,
                                                results) for c in range(args.conversations)])
            return results, time.perf_counter() - start


def _cached(rows) -> float:
    prompt = sum(r[1].prompt_tokens for r in rows)
    return 100.0 * sum(r[1].prompt_tokens_details.cached_tokens for r in rows) / prompt


def report(runs: dict, args) -> list[str]:
    aff, rr = runs["affinity"][0], runs["round-robin"][0]
    lines = ["turn   TTFT p50 ms (affinity / round-robin / ratio)   cached % (aff / rr)"]
    for turn in sorted(aff):
        a, b = p50([r[0] for r in aff[turn]]), p50([r[0] for r in rr[turn]])
        lines.append(f"{turn + 1:4}   {ms(a)} / {ms(b)} / {b / a:5.2f}"
                     f"                      {_cached(aff[turn]):3.0f} / {_cached(rr[turn]):3.0f}")
    for policy, (results, elapsed) in runs.items():
        rows = [r for turn in results.values() for r in turn]
        spread = Counter(r[2] for r in rows)
        moves = sum(len({r[2] for r in rows if r[3] == c}) - 1 for c in range(args.conversations))
        lines.append(f"{policy:>11}: {len(rows)} turns in {elapsed:.1f}s; turns per worker "
                     f"{dict(sorted(spread.items()))}; worker changes within conversations: "
                     f"{moves}; {_cached(rows):.0f}% of prompt tokens from cache")
    later = [t for t in sorted(aff) if t > 0]
    a = p50([r[0] for t in later for r in aff[t]])
    b = p50([r[0] for t in later for r in rr[t]])
    lines.append(f"turns 2-{max(aff) + 1}, p50 TTFT: affinity {a * 1000:.0f} ms, round-robin "
                 f"{b * 1000:.0f} ms: round-robin / affinity = {b / a:.2f}")
    return lines


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--think", type=float, default=3.0)
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    runs = {policy: await run_policy(policy, args) for policy in ("affinity", "round-robin")}
    return report(runs, args)


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
