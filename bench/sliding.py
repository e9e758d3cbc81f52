"""A conversation far longer than the context: sliding in blocks vs the naive way.

One worker on the default model at `--ctx 1024` (1 slot, 2 threads); one client sends a
60-turn conversation with its whole history each turn (as Open WebUI and the `openai`
package do), answers capped at 40 tokens. From about turn 25 it no longer fits. We
measure each turn's time to first token (client side) and the share of its prompt found
cached, for:

- pichat's default: the oldest turns leave in blocks of a quarter of the context, the kept
  turns' KV cells are moved (context shift), a note of what left is written first;
- the same without the note (`--memory none`);
- blocks, but the kept turns read again at each slide (`--no-context-shift`);
- the naive way, what a chat server without any of this does when a client or proxy trims
  the history: the oldest turn leaves every turn and everything after the system prompt is
  read again (`--slide-block 1 --no-context-shift --memory none`).

Ratios are against the naive way, measured side by side in this run; the projection for a
Pi 5 with a 3B model is the tokens read per turn at 15 tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import local_cluster
from pichat.protocol import ChatMessage, Sampling

SYSTEM = "You are a friendly assistant. Answer in two or three sentences."
FIRST = "Hi! My name is Ada and I live in Lisbon. I keep bees."
QUESTIONS = [
    "What do bees eat?", "How do bees make honey?", "Why do bees dance?",
    "What is a queen bee?", "How many bees live in a hive?", "What is propolis?",
    "How cold can bees survive?", "What flowers do bees like best?", "How far do bees fly?",
    "Do bees sleep?", "What is a drone bee?", "How long do bees live?",
    "What is royal jelly?", "Can bees recognise faces?", "Why do bees swarm?",
    "What threatens bees today?", "How do I start a hive?", "What is a smoker for?",
    "How is beeswax made?", "What is a worker bee's job?", "Why is pollination important?",
    "How do bees find flowers?", "What is nectar?", "How do bees keep the hive warm?",
    "What do bees do in winter?", "How many eggs does a queen lay?", "Do bees see colours?",
    "What is a honeycomb made of?", "How much honey does a hive make?",
]
LAST = "What is my name, and where do I live?"
PI_PROMPT_TPS = 15.0
"""A Pi 5 reading a prompt with a 3B Q4 model (the project's figure)."""

CONFIGS = {
    "pichat (blocks, shift, note)": (),
    "blocks, shift, no note": ("--memory", "none"),
    "blocks, read again": ("--no-context-shift", "--memory", "none"),
    "naive (every turn, read again)": ("--slide-block", "1", "--no-context-shift",
                                       "--memory", "none"),
}


def questions(turns: int) -> list[str]:
    middle = [*QUESTIONS, *(q.replace("?", ", in more detail?") for q in QUESTIONS)]
    return [FIRST, *middle[:turns - 2], LAST]


async def run(worker_args: tuple[str, ...], turns: int, model: str) -> list:
    rows = []
    async with local_cluster(workers=1, backend="llama", model=model, slots=1, threads=2,
                             ctx=1024, worker_args=worker_args) as client:
        history = [ChatMessage("system", SYSTEM)]
        for question in questions(turns):
            history.append(ChatMessage("user", question))
            reply = await client.chat(history, session="ada",
                                      sampling=Sampling(temperature=0, max_tokens=40))
            rows.append(reply)
            history.append(ChatMessage("assistant", reply.text))
    return rows


def summarize(rows: list, start: int) -> dict[str, float]:
    late = rows[start:]
    prompt = sum(r.usage.prompt_tokens for r in late)
    cached = sum(r.usage.cached_tokens for r in late)
    ttft = [r.ttft for r in late]
    return {"mean": statistics.mean(ttft), "p90": sorted(ttft)[int(0.9 * (len(ttft) - 1))],
            "cached": cached / prompt if prompt else 0.0,
            "read": (prompt - cached) / len(late),
            "name": "ada" in rows[-1].text.lower()}


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--model", default="default")
    args = parser.parse_args(argv)
    results, times = {}, {}
    for name, worker_args in CONFIGS.items():
        start = time.perf_counter()
        results[name] = await run(worker_args, args.turns, args.model)
        times[name] = time.perf_counter() - start
    # The turns from the first slide on (the same turn in every run: one tokenizer).
    naive = results["naive (every turn, read again)"]
    first = next((i for i, r in enumerate(naive) if r.usage.dropped_tokens), len(naive) - 1)
    base = summarize(naive, first)
    lines = [f"{args.turns} turns, sliding from turn {first + 1}; TTFT over turns "
             f"{first + 1}-{args.turns} (client side)",
             f"{'':32} {'TTFT mean':>9} {'p90':>7} {'x naive':>7} {'cached':>7} "
             f"{'read/turn':>9} {'Pi 5 3B':>8} {'name@60':>7} {'run':>5}"]
    for name, rows in results.items():
        s = summarize(rows, first)
        lines.append(f"{name:32} {s['mean'] * 1000:7.0f}ms {s['p90'] * 1000:5.0f}ms "
                     f"{s['mean'] / base['mean']:7.2f} {s['cached']:7.0%} "
                     f"{s['read']:9.0f} {s['read'] / PI_PROMPT_TPS:7.1f}s "
                     f"{'yes' if s['name'] else 'no':>7} {times[name]:4.0f}s")
    slides = [i + 1 for i, (a, b) in enumerate(zip(results["pichat (blocks, shift, note)"],
                                                    results["pichat (blocks, shift, note)"][1:]))
              if b.usage.dropped_tokens != a.usage.dropped_tokens]
    lines.append(f"pichat slid (and wrote a note) at turns {slides}; 'Pi 5 3B' is the mean "
                 f"prompt tokens read per turn at {PI_PROMPT_TPS:.0f} tokens/s (no note "
                 f"writing counted)")
    return lines


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
