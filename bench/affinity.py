"""Session affinity vs round-robin: multi-turn conversations on two real workers.

Several users hold 8-turn conversations at once against a router and two llama.cpp
workers on the default model. For each policy we measure the time to first token (TTFT)
of every turn, as the client sees it, and the share of prompt tokens served from a
worker's KV cache. With affinity, turn 8 should cost about what turn 1 did; without it,
each turn re-reads a growing history on a worker that does not hold it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.dirname(__file__))
from common import local_cluster, ms, p50  # noqa: E402
from pichat.protocol import ChatMessage, Sampling  # noqa: E402

SYSTEM = (
    "You are the help desk of a school's computer club. The club runs a small cluster of "
    "Raspberry Pi computers that students use to learn about networks, Linux and "
    "programming. Answer questions briefly and concretely, in plain words a beginner "
    "understands. When a question is about hardware, mention which Pi model it applies "
    "to. When it is about software, name the command or the file involved. If you are not "
    "sure, say so and suggest where to look. Never invent facts about the club."
)
QUESTIONS = [
    "How do I find the IP address of my Pi?",
    "And how do I log in to it from my laptop?",
    "What user name should I use?",
    "How do I copy a file to it?",
    "How do I see how much memory is free?",
    "How do I install a Python package?",
    "How do I make my script start at boot?",
    "How do I shut it down safely?",
]


async def user(client, uid: int, turns: int, max_tokens: int, think: float, results) -> None:
    """One person: reads each answer, thinks a while (seeded), asks the next question."""
    rng = random.Random(uid)
    history = [ChatMessage("system", SYSTEM)]
    for turn in range(turns):
        await asyncio.sleep(rng.uniform(0, think))
        history.append(ChatMessage("user", QUESTIONS[(turn + uid) % len(QUESTIONS)]))
        reply = await client.chat(history, session=f"user{uid}",
                                  sampling=Sampling(temperature=0, max_tokens=max_tokens))
        results[turn].append(reply)
        history.append(ChatMessage("assistant", reply.text))


async def run_policy(policy: str, users: int, turns: int, max_tokens: int, think: float,
                     model: str):
    results: dict[int, list] = defaultdict(list)
    async with local_cluster(workers=2, backend="llama", model=model, slots=1, threads=1,
                             ctx=4096, policy=policy) as client:
        start = time.perf_counter()
        await asyncio.gather(*[user(client, u, turns, max_tokens, think, results)
                               for u in range(users)])
        elapsed = time.perf_counter() - start
        status = await client.status()
    return results, elapsed, status


def report(runs: dict[str, tuple]) -> list[str]:
    lines = ["        TTFT p50 ms             prompt eval p50 ms      prompt tokens   cached %",
             "turn    affinity  r-robin  ratio   affinity  r-robin  ratio   p50"
             "             aff / rr"]
    aff, rr = runs["affinity"][0], runs["round-robin"][0]
    for turn in sorted(aff):
        a, b = p50([r.ttft for r in aff[turn]]), p50([r.ttft for r in rr[turn]])
        pa = p50([r.usage.prompt_ms / 1000 for r in aff[turn]])
        pb = p50([r.usage.prompt_ms / 1000 for r in rr[turn]])
        tokens = p50([r.usage.prompt_tokens for r in aff[turn]])
        lines.append(f"{turn + 1:4}    {ms(a):>8} {ms(b):>8} {b / a:6.2f}   "
                     f"{ms(pa):>8} {ms(pb):>8} "
                     f"{pb / pa:6.2f}   {tokens:6.0f}          {_cached(aff[turn]):3.0f} / "
                     f"{_cached(rr[turn]):3.0f}")
    for policy, (results, elapsed, status) in runs.items():
        every = [r for turn in results.values() for r in turn]
        workers = {w['name']: w['served'] for w in status['workers']}
        lines.append(f"{policy:>11}: {len(every)} turns in {elapsed:.1f}s, "
                     f"{_cached(every):.0f}% of prompt tokens from cache, per worker {workers}")
    later = [t for t in sorted(aff) if t > 0]
    measures = (("TTFT", lambda r: r.ttft),
                ("prompt evaluation", lambda r: r.usage.prompt_ms / 1000))
    for label, key in measures:
        a = p50([key(r) for t in later for r in aff[t]])
        b = p50([key(r) for t in later for r in rr[t]])
        lines.append(f"turns 2-{max(aff) + 1}, p50 {label}: affinity {a * 1000:.0f} ms, "
                     f"round-robin {b * 1000:.0f} ms: round-robin / affinity = {b / a:.2f}")
    first, last = p50([r.ttft for r in aff[0]]), p50([r.ttft for r in aff[max(aff)]])
    lines.append(f"affinity: last-turn / first-turn TTFT = {last / first:.2f}")
    return lines


def _cached(replies) -> float:
    prompt = sum(r.usage.prompt_tokens for r in replies)
    return 100.0 * sum(r.usage.cached_tokens for r in replies) / prompt if prompt else 0.0


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--think", type=float, default=2.0,
                        help="Seconds a user may pause between turns (uniform, seeded).")
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    runs = {}
    for policy in ("affinity", "round-robin"):
        runs[policy] = await run_policy(policy, args.users, args.turns, args.max_tokens,
                                        args.think, args.model)
    return report(runs)


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
