"""What a worker needs from an inference backend (llama.cpp, or the simulator).

A `Model` is loaded once per worker; each slot owns one `Context`, which holds one
conversation's KV state at a time and is only ever used from that slot's thread. The
worker's `SlotManager` decides which conversation lives in which context and saves and
restores their states; a backend only has to generate, and to save/restore its KV.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pichat.protocol import ChatMessage, Finish, Sampling
from pichat.worker.engine.summary import Note
from pichat.worker.engine.textstream import TextStream

__all__ = ["Model", "Context", "SavedState", "Generation", "Room", "common_prefix"]


@dataclass(frozen=True, slots=True)
class SavedState:
    """A conversation's KV cache outside any context: the token ids it covers, and the
    backend's bytes for them (`data`; the simulator stores none and only counts)."""

    tokens: tuple[int, ...]
    data: bytes
    nbytes: int
    owner: str | None = None
    """Whose conversation it is (the router's owner tag), set by the slot manager."""
    format: str = ""
    """What the bytes depend on (model, KV cache type): a state is only loaded into a
    context of the same format."""


@dataclass(frozen=True, slots=True)
class Generation:
    finish: Finish
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_ms: float
    generate_ms: float
    dropped_tokens: int = 0
    """Tokens that left the context: the oldest turns of a conversation too long for it
    (pichat/worker/store/window.py), and what an answer reaching its end shifted out."""
    note: Note | None = None
    """A note of the turns that left, written for this request (pichat/worker/engine/summary.py)."""
    embeddings: tuple[bytes, ...] = ()
    """An embed request's vectors (little-endian float32s, unit length)."""
    tools_left_out: tuple[str, ...] = ()
    """The request's tools that did not fit the context beside its conversation."""


@dataclass(frozen=True, slots=True)
class Room:
    """How an answer that reaches the end of the context goes on (context shift): the
    first `keep` tokens (the system prompt) stay, the next `block` leave, the rest move
    down, and generation continues."""

    keep: int
    block: int


class Context(Protocol):
    def tokens(self) -> Sequence[int]:
        """The token ids whose KV state this context holds, in order."""

    def save(self) -> SavedState: ...

    def restore(self, state: SavedState) -> bool:
        """Replace this context's state with `state`. False (and an empty context) if the
        backend could not load it."""

    def clear(self) -> None: ...

    def truncate(self, n: int) -> None:
        """Keep only the KV state of the first `n` tokens (the rest is recomputed)."""

    def adopt(self, donor: Context, prefix: Sequence[int]) -> int:
        """Hold the longest start of `prefix` that `donor` (another context of the same
        model) holds, copying its KV cells instead of evaluating those tokens again, where
        the backend can; returns how many tokens of `prefix` this context now holds (0,
        and unchanged, if the backend cannot)."""

    def splice(self, prompt: Sequence[int]) -> int:
        """Hold as much of `prompt` as this context's cells can give after their common
        start, by removing what the prompt left out and moving the rest
        (pichat/worker/engine/shift.py); returns how many of the prompt's tokens it now holds
        (the common start alone where the backend cannot shift)."""

    def generate(self, prompt: Sequence[int], sampling: Sampling, out: TextStream,
                 cancelled: threading.Event, resume: int = 0, room: Room | None = None
                 ) -> Generation:
        """Evaluate the part of `prompt` not already held (the common prefix is reused),
        then sample until a stop, `sampling.max_tokens`, the context's end (unless `room`
        lets the answer shift the context and go on, where the backend can), or
        `cancelled`. Text goes to `out` as it is generated. The last `resume` tokens of
        `prompt` are an answer already begun (a failover): generation continues it."""


class Model(Protocol):
    name: str
    backend: str
    engine: str
    """How the slots' contexts are made: `batched` (one context), `contexts`, `sim`."""
    n_ctx: int
    n_vocab: int
    """Token ids are below this (a continuation from the router is checked against it)."""
    kv_type: str
    kv_token_bytes: int
    """RAM one token of one conversation takes in the KV cache."""
    weights_bytes: int
    """The size of the model's weights (mapped from the GGUF file)."""
    family: str
    """The model's architecture (the GGUF's `general.architecture`: qwen2, llama, gemma3)."""
    parameter_size: str
    """Its parameter count, as Ollama writes it ("494.03M", "3.21B")."""
    quantization: str
    """How its weights are stored ("Q4_K_M", "Q8_0", "F16"; "" where unknown)."""
    format: str
    """What a saved state of this model is valid for (`SavedState.format`)."""

    tool_family: str
    """How the model writes a tool call: hermes, llama3, generic (pichat/worker/engine/tools.py)."""

    def chat_tokens(self, messages: Sequence[ChatMessage], tools: str = "") -> list[int]:
        """The prompt for `messages` (and the functions the model may call, `tools`: JSON
        text) in the model's chat template, ending where the assistant's answer starts."""

    def prefix_tokens(self, messages: Sequence[ChatMessage], k: int, tools: str = ""
                      ) -> list[int]:
        """The tokens of the first `k` messages as the chat template renders them before
        any later message: for a template that renders a conversation message by message,
        a prefix of `chat_tokens(messages)`; its length is a message boundary."""

    def text_tokens(self, text: str) -> list[int]:
        """The prompt for plain text (no chat template), as a completion continues it."""

    def embed(self, texts: Sequence[str]) -> tuple[list[bytes], int]:
        """Each text's embedding (mean-pooled, unit length, float32 bytes) and the tokens
        read. Raises BadRequest for a text longer than the model embeds at once."""

    def new_context(self, threads: int) -> Context: ...

    def close(self) -> None: ...


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
