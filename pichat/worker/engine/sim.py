"""A simulated backend: a test and benchmark instrument, not a model.

It behaves like a llama.cpp worker where routing can tell the difference: it reuses the
KV prefix it holds exactly as the real backend does (same cached/uncached accounting,
same save/restore through the worker's session store), and it takes time in proportion
to the work: `prompt_tps` for uncached prompt tokens, `gen_tps` for generated ones. So
many workers can run on one machine for routing, scale and fault tests.

Tokens are whitespace-separated words (and one token per role marker); the answer is a
deterministic string of words (a function of the prompt under temperature 0, or of the
seed), so a later turn that quotes it re-tokenizes to the same ids.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
import zlib
from collections.abc import Sequence

from pichat.config import SimConfig
from pichat.protocol import ChatMessage, Sampling
from pichat.worker.engine import shift
from pichat.worker.engine.backend import Generation, Room, SavedState, common_prefix
from pichat.worker.engine.textstream import TextStream
from pichat.worker.engine.tools import template_tools

__all__ = ["SimModel", "SimContext"]

_MARKERS = {"system": 1, "user": 2, "assistant": 3, "tool": 4}
_END = 5
_WORDS = (
    "the cluster answers quickly because each conversation returns to the worker that "
    "already holds its cache so only new tokens are read again while other pis wait "
    "for work and the router keeps every slot busy without losing a single request"
).split()


_VOCAB = 1_000_000


def _word_id(word: str) -> int:
    return 100 + zlib.crc32(word.encode()) % _VOCAB


class SimModel:
    backend = engine = "sim"
    tool_family = "hermes"
    n_vocab = 100 + _VOCAB
    kv_type = "f16"
    weights_bytes = 0
    family = "sim"
    parameter_size = quantization = ""

    def __init__(self, config: SimConfig, n_ctx: int, name: str = "sim") -> None:
        self.config = config
        self.n_ctx = n_ctx
        self.name = name
        self.kv_token_bytes = config.kv_bytes_per_token
        self.format = f"sim:{name}"

    def chat_tokens(self, messages: Sequence[ChatMessage], tools: str = "") -> list[int]:
        return [*self.prefix_tokens(messages, len(messages), tools), _MARKERS["assistant"]]

    def prefix_tokens(self, messages: Sequence[ChatMessage], k: int, tools: str = ""
                      ) -> list[int]:
        tokens: list[int] = []
        if tools and k:  # a tools block first, a word a token, as a template shows them
            for function in template_tools(tools, compact=True) or []:
                tokens.extend(self.text_tokens(json.dumps(function, ensure_ascii=False)))
        for message in messages[:k]:
            tokens.append(_MARKERS[message.role])
            tokens.extend(_word_id(w) for w in message.content.split())
            tokens.append(_END)
        return tokens

    def text_tokens(self, text: str) -> list[int]:
        return [_word_id(w) for w in text.split()]

    def embed(self, texts: Sequence[str]) -> tuple[list[bytes], int]:
        """A bag of words hashed into 64 dimensions: texts sharing words are close."""
        out, n = [], 0
        for text in texts:
            vector = [0.0] * 64
            for word in text.lower().split():
                vector[zlib.crc32(word.encode()) % 64] += 1.0
                n += 1
            norm = sum(v * v for v in vector) ** 0.5 or 1.0
            out.append(struct.pack("<64f", *(v / norm for v in vector)))
        time.sleep(n / self.config.prompt_tps)
        return out, n

    def new_context(self, threads: int) -> SimContext:
        return SimContext(self)

    def close(self) -> None:
        pass


class SimContext:
    def __init__(self, model: SimModel) -> None:
        self.model = model
        self._tokens: list[int] = []

    def tokens(self) -> Sequence[int]:
        return self._tokens

    def save(self) -> SavedState:
        n = len(self._tokens)
        return SavedState(tuple(self._tokens), b"", n * self.model.config.kv_bytes_per_token,
                          format=self.model.format)

    def restore(self, state: SavedState) -> bool:
        if state.format != self.model.format:
            self._tokens = []
            return False
        self._tokens = list(state.tokens)
        return True

    def clear(self) -> None:
        self._tokens = []

    def truncate(self, n: int) -> None:
        del self._tokens[n:]

    def adopt(self, donor: object, prefix: Sequence[int]) -> int:
        return 0  # simulated contexts share no cells

    def splice(self, prompt: Sequence[int]) -> int:
        plan = shift.plan(self._tokens, prompt)
        if plan is None:
            return common_prefix(self._tokens, prompt)
        time.sleep((plan.at - plan.keep + 1) / self.model.config.prompt_tps)  # Z, settle
        self._tokens = list(prompt[:plan.reused])
        return plan.reused

    def generate(self, prompt: Sequence[int], sampling: Sampling, out: TextStream,
                 cancelled: threading.Event, resume: int = 0, room: Room | None = None
                 ) -> Generation:
        cfg = self.model.config
        t0 = time.perf_counter()
        cached = min(common_prefix(self._tokens, prompt), len(prompt) - 1)
        uncached = len(prompt) - cached
        del self._tokens[cached:]
        if cancelled.wait(uncached / cfg.prompt_tps):
            return Generation("cancelled", len(prompt), cached, 0,
                              (time.perf_counter() - t0) * 1000, 0.0)
        self._tokens.extend(prompt[cached:])
        t1 = time.perf_counter()

        # The answer is a function of the prompt without the part already answered
        # (`resume` tokens, a failover's continuation), so a continued answer goes on
        # exactly as the original would have.
        base = prompt[: len(prompt) - resume]
        if sampling.seed is not None:
            rng = random.Random(sampling.seed)
        elif sampling.temperature == 0:
            rng = random.Random(zlib.crc32(repr(list(base)).encode()))
        else:
            rng = random.Random()
        for _ in range(resume):
            rng.choice(_WORDS)
        limit = sampling.max_tokens if room else min(sampling.max_tokens,
                                                     self.model.n_ctx - len(prompt))
        dropped = 0
        wanted = max(0, cfg.reply_tokens - resume)
        finish = "stop" if wanted <= limit else "length"
        n = 0
        if sampling.grammar and not sampling.grammar_trigger and not resume:
            # A grammar (a JSON format, a forced call): the simulator answers a JSON object
            # of its words, so clients see what a constrained answer looks like.
            words = [rng.choice(_WORDS) for _ in range(min(wanted, limit))]
            text = json.dumps({"answer": " ".join(words)})
            out.push(text.encode(), _word_id(words[0]) if words else 0)
            self._tokens.extend(_word_id(w) for w in words)
            t2 = time.perf_counter()
            return Generation("stop", len(prompt), cached, len(words), (t1 - t0) * 1000,
                              (t2 - t1) * 1000)
        for i in range(resume, resume + min(wanted, limit)):
            if n and cancelled.wait(1.0 / cfg.gen_tps):
                finish = "cancelled"
                break
            if cancelled.is_set():
                finish = "cancelled"
                break
            word = rng.choice(_WORDS)
            n += 1
            if room and len(self._tokens) >= self.model.n_ctx:  # context shift
                gone = min(room.block, len(self._tokens) - room.keep - 1)
                del self._tokens[room.keep:room.keep + gone]
                dropped += gone
            self._tokens.append(_word_id(word))
            if out.push(((" " if i else "") + word).encode(), _word_id(word)):
                finish = "stop"
                break
        if finish != "stop" and n:
            # As in llama.cpp, the last sampled token was never fed back: not in the KV.
            self._tokens.pop()
        t2 = time.perf_counter()
        return Generation(finish, len(prompt), cached, n, (t1 - t0) * 1000, (t2 - t1) * 1000,
                          dropped)
