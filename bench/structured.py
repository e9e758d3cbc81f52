"""What a grammar costs: the same answers free and held to a JSON schema or a tool call.

The default model on the batched engine (1 lane, 2 threads), in-process (the router adds
the same to both). For each prompt: a free answer and one held to a JSON schema
(`response_format`); with the tools shown in the prompt, a free answer and one held to a
tool call (`tool_choice: required`); each greedy, up to 64 tokens. The grammar checks
each token the chain picks and is applied to the whole vocabulary only when it refuses
one (as llama.cpp's own sampler does). We report the time to first token and the
generation speed of each, as ratios to the free answer on the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import threading

from pichat.models import resolve
from pichat.protocol import ChatMessage, Request, RequestId, Sampling
from pichat.worker.engine.llama import LlamaModel
from pichat.worker.engine.textstream import TextStream
from pichat.worker.engine.tools import grammar_for

PROMPTS = [
    "Describe a cat called Tom in a few words.",
    "Tell me about the city of Lisbon.",
    "Invent a programmer and describe them.",
    "What is the weather usually like in Oslo in winter?",
]
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "summary": {"type": "string"},
    "facts": {"type": "array", "items": {"type": "string"}, "maxItems": 4}},
    "required": ["name", "summary", "facts"]}
TOOLS = [{"name": "lookup", "description": "Look a subject up.", "parameters": {
    "type": "object", "properties": {"subject": {"type": "string"},
                                     "detail": {"type": "string", "enum": ["short", "long"]}},
    "required": ["subject", "detail"]}}]


def run(model: LlamaModel, lane, prompt: str, mode: str) -> tuple[float, float, int]:
    messages = (ChatMessage("user", prompt),)
    shown = mode in ("tool", "tools shown")
    request = Request(RequestId("b"), messages, tools=json.dumps(TOOLS) if shown else "",
                      tool_choice={"tool": "required", "tools shown": "none"}.get(mode, ""),
                      format=json.dumps(SCHEMA) if mode == "schema" else "")
    grammar, trigger = grammar_for(request, model.tool_family)
    sampling = Sampling(temperature=0, max_tokens=64, grammar=grammar, grammar_trigger=trigger)
    tokens = model.chat_tokens(messages, request.tools)
    lane.clear()
    out = TextStream(lambda *_: None)
    g = lane.generate(tokens, sampling, out, threading.Event())
    out.close()
    tps = (g.completion_tokens - 1) / (g.generate_ms / 1000) if g.generate_ms else 0.0
    return g.prompt_ms, tps, g.completion_tokens


async def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="default")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args(argv)
    model = LlamaModel(str(resolve(args.model)[0]), n_ctx=2048, threads=2, lanes=1)
    lane = model.new_context(2)
    try:
        results: dict[str, list[tuple[float, float, int]]] = {
            "free": [], "schema": [], "tools shown": [], "tool": []}
        for _ in range(args.repeat):
            for prompt in PROMPTS:
                for mode in results:  # side by side, prompt by prompt
                    results[mode].append(run(model, lane, prompt, mode))
    finally:
        model.close()
    base_ttft = statistics.median(r[0] for r in results["free"])
    base_tps = statistics.median(r[1] for r in results["free"])
    lines = [f"{'':12} {'TTFT ms':>8} {'ratio':>6} {'tokens/s':>9} {'ratio':>6} {'tokens':>7}"]
    for mode, rows in results.items():
        if mode == "tool":  # against the same prompt (the tools shown), free
            base_ttft = statistics.median(r[0] for r in results["tools shown"])
            base_tps = statistics.median(r[1] for r in results["tools shown"])
        ttft = statistics.median(r[0] for r in rows)
        tps = statistics.median(r[1] for r in rows)
        lines.append(f"{mode:12} {ttft:8.0f} {ttft / base_ttft:6.2f} {tps:9.1f} "
                     f"{tps / base_tps:6.2f} {statistics.mean(r[2] for r in rows):7.1f}")
    lines.append(f"(medians over {len(results['free'])} answers each; ratios: schema to free, "
                 "tool call to the same prompt with the tools shown, free; building the "
                 "grammar is in the TTFT)")
    return lines


if __name__ == "__main__":
    print("\n".join(asyncio.run(main())))
