"""Expected seconds, for deciding where a request goes: pure functions, no clock, no I/O.

A conversation is cheap where its KV state is and dear elsewhere, so when its warm worker
is busy the question is which is sooner: a slot there, or the state (or a re-read of the
history) on a worker that is free now. Both sides are estimates from measured speeds:

    waiting:   when the warm worker frees a slot for this request, from the work left in
               what it runs (prompt still to read, answer still to write) and in the
               requests queued before this one for it (SlotClock)
    elsewhere: the history moved (its tokens x the source's KV bytes per token / the
               link's measured bytes per second, where both workers share a state
               format) or read again (its tokens / the target's prompt tokens per second),
               whichever is less

What is not measured yet takes a default from a fast machine (this VM's 2 cores on the
0.5B default model); a worker reports its own speeds in every heartbeat and the router
measures the link on every transfer, so the defaults matter only at start.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Speed", "Running", "Estimates", "SlotClock", "bring_seconds", "move_beats_read",
           "run_seconds", "left_seconds", "DEFAULT_PROMPT_TPS", "DEFAULT_DECODE_TPS",
           "DEFAULT_LINK_BPS"]

DEFAULT_PROMPT_TPS = 300.0
"""Prompt tokens per second read by one request, until the worker has reported its own."""
DEFAULT_DECODE_TPS = 20.0
"""Answer tokens per second of one request, until the worker has reported its own."""
DEFAULT_LINK_BPS = 50e6
"""Bytes per second a state moves at, until a transfer has been measured (a loaded
gigabit LAN)."""
MOVE_LATENCY_S = 0.05
"""A transfer's fixed cost: messages through the router, the state saved and loaded."""
TAIL_TOKENS = 8
"""An answer that ran past its expected length is taken to end this many tokens later."""


class Running(Protocol):
    """What `left_seconds` reads of a running request (the scheduler's `Job`)."""

    @property
    def abandoned(self) -> bool: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def tokens_out(self) -> int: ...
    @property
    def read_tokens(self) -> float: ...
    @property
    def started(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Speed:
    """What a worker measured of itself (heartbeats) and announced (READY)."""

    prompt_tps: float = 0.0
    """Prompt tokens per second one request reads (0: not measured yet)."""
    decode_tps: float = 0.0
    """Answer tokens per second one request gets (0: not measured yet)."""
    kv_token_bytes: int = 0
    """Bytes of KV state per token (0: its states cannot move)."""
    state_format: str = ""
    """What its states are valid for; states move only between equal formats."""

    @property
    def read_tps(self) -> float:
        return self.prompt_tps or DEFAULT_PROMPT_TPS

    @property
    def write_tps(self) -> float:
        return self.decode_tps or DEFAULT_DECODE_TPS


def _read_tps(target: Speed, source: Speed) -> float:
    # Not measured on the target yet: a worker of the same state format runs the same
    # model, so the source's speed is the better guess.
    if not target.prompt_tps and source.state_format == target.state_format:
        return source.read_tps
    return target.read_tps


@dataclass(slots=True)
class Estimates:
    """What the router learns from finished requests, cluster-wide."""

    tokens_per_char: float = 0.3
    """Prompt tokens per character of conversation text (chat template included)."""
    answer_tokens: float = 128.0
    """Tokens an answer takes, on average."""
    link_bps: float = DEFAULT_LINK_BPS
    """Bytes per second a state moved at, measured (a moving average)."""

    def learn(self, prompt_chars: int, prompt_tokens: int, answer_tokens: int) -> None:
        """One finished request's figures (as its worker reported them: a ratio no
        tokenizer makes is clamped, so one lying worker cannot skew them far)."""
        if prompt_chars > 0 and prompt_tokens > 0:
            ratio = min(max(prompt_tokens / prompt_chars, 0.05), 2.0)
            self.tokens_per_char += 0.2 * (ratio - self.tokens_per_char)
        if answer_tokens > 0:
            self.answer_tokens += 0.2 * (answer_tokens - self.answer_tokens)

    def learn_link(self, nbytes: int, seconds: float) -> None:
        self.link_bps = 0.7 * self.link_bps + 0.3 * (nbytes / max(seconds, 1e-3))

    def answer(self, max_tokens: int) -> float:
        """Tokens an answer capped at `max_tokens` (0: no cap known) is expected to take."""
        return min(self.answer_tokens, max_tokens) if max_tokens > 0 else self.answer_tokens


def move_beats_read(source: Speed, target: Speed, link_bps: float) -> bool:
    """Is moving a state from `source` cheaper per token than `target` reading it?"""
    if not source.state_format or source.state_format != target.state_format:
        return False
    if source.kv_token_bytes <= 0:
        return False
    return source.kv_token_bytes / link_bps < 1.0 / _read_tps(target, source)


def bring_seconds(tokens: float, source: Speed, target: Speed, link_bps: float,
                  migrate: bool) -> float:
    """Seconds until `target` holds `tokens` of a conversation warm on `source`: the state
    moved (where `migrate` allows and it is cheaper) or the history read again."""
    read = tokens / _read_tps(target, source)
    if migrate and move_beats_read(source, target, link_bps):
        return min(read, MOVE_LATENCY_S + tokens * source.kv_token_bytes / link_bps)
    return read


def run_seconds(read_tokens: float, answer_tokens: float, speed: Speed) -> float:
    """Seconds a request takes on a worker: its prompt read, its answer written."""
    return read_tokens / speed.read_tps + answer_tokens / speed.write_tps


def left_seconds(job: Running, speed: Speed, estimates: Estimates, now: float) -> float:
    """Seconds of work left in a running request (0 for one being cancelled)."""
    if job.abandoned:
        return 0.0
    answer = estimates.answer(job.max_tokens)
    if job.tokens_out == 0:  # still reading its prompt
        read_left = max(job.read_tokens / speed.read_tps - (now - job.started), 0.0)
        return read_left + answer / speed.write_tps
    return max(answer - job.tokens_out, TAIL_TOKENS) / speed.write_tps


class SlotClock:
    """When each slot of one worker is expected to be free, and how that moves as requests
    queued for it take slots in turn: an event simulation over the worker's slots."""

    __slots__ = ("_free_at",)

    def __init__(self, slots: int, busy_for: list[float]) -> None:
        """`busy_for`: seconds of work left in each running request (one per busy slot)."""
        times = sorted(busy_for)[:slots]
        self._free_at = times + [0.0] * (slots - len(times))
        heapq.heapify(self._free_at)

    def next_free(self) -> float:
        """Seconds until a slot is free for the next request in line."""
        return self._free_at[0] if self._free_at else float("inf")

    def take(self, seconds: float) -> None:
        """The next request in line takes the first free slot for `seconds`."""
        if self._free_at:
            heapq.heapreplace(self._free_at, self._free_at[0] + seconds)
