"""One llama.cpp context, many conversations: a continuously batched engine.

One context holds up to `lanes` sequences (llama.cpp's `n_seq_max`, each with its own
`n_ctx` cells), driven by one engine thread. Each step it takes one next token for every
sequence that is generating plus a slice of prompt for sequences still reading theirs
(at most `PREFILL_SLICE` each, within `n_batch`: a long new prompt never freezes the
streams already running), calls `llama_decode` once, and samples each sequence that has
logits with its own sampler chain (temperature, top_p, top_k, min_p, repeat penalty,
seed), so every request keeps its own sampling and a fixed seed stays reproducible
whatever runs beside it. Requests join and leave between steps; a cancel is noticed within
one step.

Each lane is a `Context` (pichat/worker/engine/backend.py) to the slot manager, which keeps
deciding which conversation lives in which lane and saves and restores their states: a
lane's `generate` hands its work to the engine and waits for it, and every other use of
the context (save, restore, truncate) runs on the engine thread between steps, since a
llama.cpp context is not thread-safe.

Each lane has its own `n_ctx` cells (`kv_unified` off). Conversations that begin alike
(one system prompt for everyone) still evaluate their common start once: a lane adopts
another's cells by copy (`llama_memory_seq_cp`, a memory copy of milliseconds instead of
seconds to minutes of prompt reading). A unified cache would tag shared cells instead of
copying them, but measured here (default model, greedy, 8 prompts, 4 lanes) it changed an
answer from its first token, where separate cells kept 7 of 8 answers equal to their runs
alone (the eighth parted after 24 tokens): attention over a pool of every lane's cells
rounds differently from attention over one's own. Separate cells also constrain batching:
llama.cpp puts only consecutive lane ids in one ubatch, so each step lists its lanes in
ascending order. The cells are reserved up front either way, so copying costs no RAM. The
cache holds `f16`, `q8_0` or `q4_0` values (`kv_type`; flash attention, which llama.cpp
needs for a quantized V cache, is on for those).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import queue
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pichat.errors import BadRequest, PichatError
from pichat.protocol import Sampling
from pichat.worker.engine import shift
from pichat.worker.engine.backend import Generation, Room, SavedState, common_prefix
from pichat.worker.engine.llamalib import KV_TYPES, Pieces, load_seq, save_seq
from pichat.worker.engine.textstream import TextStream
from pichat.worker.engine.tools import TOOL_CALL

__all__ = ["BatchEngine", "Lane", "PREFILL_SLICE"]

log = logging.getLogger(__name__)

PREFILL_SLICE = 128
"""Prompt tokens of one sequence per step: the streams running beside a long prompt get a
token every step. (Measured on one context: 128-token slices read as fast as 512.)"""


@dataclass(slots=True)
class _Job:
    lane: int
    pending: list[int]
    """Prompt tokens not yet evaluated."""
    prompt_tokens: int
    cached: int
    sampling: Sampling
    out: TextStream
    cancelled: threading.Event
    chain: Any
    limit: int
    room: Room | None = None
    grammar: Any = None
    """The answer's grammar sampler, kept out of the chain (see `_sample`)."""
    triggers: tuple[re.Pattern[bytes], ...] | None = None
    """Where the grammar starts to apply, if not from the start (`_follow`)."""
    seen: bytes = b""
    """The answer's text so far, while the grammar waits for a trigger."""
    future: Future = field(default_factory=Future)
    generated: int = 0
    dropped: int = 0
    """Tokens that left the context to make room for the answer."""
    last: int | None = None
    """The token sampled last, fed back next step."""
    started: float = field(default_factory=time.perf_counter)
    first: float | None = None
    last_at: float = 0.0


_SEEN_BYTES = 4096
"""An answer's text kept while its grammar waits for a trigger (then only its tail)."""


def _triggers(text: str) -> tuple[re.Pattern[bytes], ...] | None:
    """The trigger patterns of a `Sampling.grammar_trigger` (None: the grammar applies
    from the start)."""
    return tuple(_compiled(t) for t in text.split("\n")) if text else None


@functools.lru_cache(maxsize=16)
def _compiled(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode())


class BatchEngine:
    """The context and its thread. `Lane`s are its sequences."""

    def __init__(self, llm: Any, lib: Any, *, lanes: int, n_ctx: int, threads: int,
                 kv_type: str = "f16", fmt: str = "", n_batch: int = 512) -> None:
        self._lib = lib
        self._llm = llm  # the model must outlive the context
        self.lanes = lanes
        self.n_ctx = n_ctx
        self.format = fmt
        params = lib.llama_context_default_params()
        params.n_ctx = n_ctx * lanes
        params.n_batch = params.n_ubatch = min(n_batch, n_ctx)
        params.n_seq_max = lanes
        params.n_threads = params.n_threads_batch = threads
        params.kv_unified = False  # each lane its own cells (see above)
        params.type_k = params.type_v = KV_TYPES[kv_type][0]
        if kv_type != "f16":
            params.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_ENABLED
        self.ctx = lib.llama_init_from_model(llm._model.model, params)
        if not self.ctx:
            raise PichatError(f"llama.cpp could not make a context of {lanes} x {n_ctx} tokens")
        self._mem = lib.llama_get_memory(self.ctx)
        self.can_shift = bool(lib.llama_memory_can_shift(self._mem))
        self._call_ids: list[int] | None = None
        """The tokens of a tool call's start (`TOOL_CALL`), tokenized once."""
        self._vocab = llm._model.vocab
        self._n_vocab = llm.n_vocab()
        self._n_batch = params.n_batch
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self.tokens: list[list[int]] = [[] for _ in range(lanes)]
        """What each lane's KV cells hold, in order."""
        self._jobs: dict[int, _Job] = {}
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._closed = False
        self._piece = Pieces(lib, self._vocab)
        self._thread = threading.Thread(target=self._loop, name="batch-engine", daemon=True)
        self._thread.start()

    # --- called from other threads ----------------------------------------------------

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the engine thread between steps; its result (or exception)."""
        if self._closed:
            raise PichatError("the worker is stopping")
        future: Future = Future()
        self._commands.put((fn, future))
        self._wake.set()
        return future.result()

    def generate(self, lane: int, prompt: Sequence[int], sampling: Sampling, out: TextStream,
                 cancelled: threading.Event, room: Room | None = None, resume: int = 0
                 ) -> Generation:
        job = self.call(lambda: self._start(lane, list(prompt), sampling, out, cancelled,
                                            room if self.can_shift else None, resume))
        return job.future.result()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        self._thread.join()
        while True:  # a command that came after the engine's last round
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            future.set_exception(PichatError("the worker is stopping"))
        self._lib.llama_batch_free(self._batch)
        self._lib.llama_free(self.ctx)

    # --- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            self._run_commands()
            if not self._jobs:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as exc:  # a failed decode ends what was running, not the engine
                log.exception("batch step failed")
                for lane in list(self._jobs):
                    self._finish(lane, error=exc)
        for lane in list(self._jobs):
            self._finish(lane, error=PichatError("the worker is stopping"))
        self._run_commands()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _start(self, lane: int, prompt: list[int], sampling: Sampling, out: TextStream,
               cancelled: threading.Event, room: Room | None, resume: int = 0) -> _Job:
        if lane in self._jobs:
            raise PichatError(f"lane {lane} is busy")
        held = self.tokens[lane]
        cached = min(common_prefix(held, prompt), len(prompt) - 1)
        self._truncate(lane, cached)
        limit = sampling.max_tokens if room else min(sampling.max_tokens,
                                                     self.n_ctx - len(prompt))
        job = _Job(lane, prompt[cached:], len(prompt), cached, sampling, out, cancelled,
                   self._chain(sampling), limit, room, self._grammar(sampling),
                   _triggers(sampling.grammar_trigger))
        if job.grammar is not None:  # an answer begun elsewhere: the grammar goes on after it
            for token in prompt[len(prompt) - resume:]:
                self._follow(job, token)
        self._jobs[lane] = job
        return job

    def _step(self) -> None:
        lib, batch = self._lib, self._batch
        for lane, job in list(self._jobs.items()):
            if job.cancelled.is_set():
                self._finish(lane, "cancelled")
        # Every generating lane gets its token; prompt slices share what room is left.
        room = self._n_batch - sum(job.last is not None for job in self._jobs.values())
        n = 0
        outputs: dict[int, int] = {}  # lane -> its batch index with logits
        # Lanes in ascending order, each lane's tokens together: llama.cpp splits a batch
        # over separate per-lane cells into runs of consecutive lane ids (one ubatch per
        # run), so four generating lanes 0-3 make one ubatch, not four.
        for lane in sorted(self._jobs):
            job = self._jobs[lane]
            if job.last is not None:  # generating: one token
                if len(self.tokens[lane]) >= self.n_ctx and not self._make_room(lane, job):
                    self._finish(lane, "length")
                    continue
                self._put(n, job.last, len(self.tokens[lane]), lane, True)
                self.tokens[lane].append(job.last)
                outputs[lane] = n
                n += 1
            elif job.pending and room > 0:  # reading its prompt: a slice
                take = job.pending[:min(PREFILL_SLICE, room)]
                del job.pending[:len(take)]
                room -= len(take)
                base = len(self.tokens[lane])
                for i, token in enumerate(take):
                    last = not job.pending and i == len(take) - 1
                    self._put(n, token, base + i, lane, last)
                    if last:
                        outputs[lane] = n
                    n += 1
                self.tokens[lane].extend(take)
        if n == 0:
            return
        batch.n_tokens = n
        rc = lib.llama_decode(self.ctx, batch)
        if rc != 0:
            raise PichatError(f"llama_decode failed ({rc})")
        for lane, index in outputs.items():
            self._sample(lane, self._jobs[lane], index)

    def _put(self, i: int, token: int, pos: int, lane: int, logits: bool) -> None:
        b = self._batch
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = lane
        b.logits[i] = logits

    def _sample(self, lane: int, job: _Job, index: int) -> None:
        token = self._lib.llama_sampler_sample(job.chain, self.ctx, index)
        if job.grammar is not None:
            # As llama.cpp's own sampler does: the chain picks freely, the grammar only
            # checks that one token; only if it refuses is the grammar applied to the
            # whole vocabulary (~150,000 tokens for Qwen: twice the time of a step).
            if job.triggers is None and not self._allowed(job.grammar, token):
                token = self._constrained(job, index)
            self._follow(job, token)
        now = time.perf_counter()
        if job.first is None:
            job.first = now
        job.last_at = now
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            self._finish(lane, "stop")
            return
        job.generated += 1
        if job.out.push(self._piece(token), token):
            self._finish(lane, "stop")
        elif job.generated >= job.limit:
            self._finish(lane, "length")
        elif job.cancelled.is_set():
            self._finish(lane, "cancelled")
        else:
            job.last = token

    def _finish(self, lane: int, finish: str = "stop", error: BaseException | None = None
                ) -> None:
        job = self._jobs.pop(lane)
        self._lib.llama_sampler_free(job.chain)
        if job.grammar is not None:
            self._lib.llama_sampler_free(job.grammar)
        if error is not None:
            self._truncate(lane, 0)
            job.future.set_exception(error)
            return
        if job.pending:  # cancelled while reading its prompt: what was read stays cached
            finish = "cancelled"
        t0, t1 = job.started, job.first or time.perf_counter()
        job.future.set_result(Generation(
            finish, job.prompt_tokens, job.cached, job.generated,  # type: ignore[arg-type]
            (t1 - t0) * 1000, ((job.last_at or t1) - t1) * 1000, job.dropped))

    def _grammar(self, s: Sampling) -> Any:
        """The grammar sampler of `s` (None: no grammar)."""
        if not s.grammar:
            return None
        lib = self._lib
        if s.grammar_trigger and self._call_ids is None:
            # The call's start may be one token (Qwen's <tool_call>), whose piece may be
            # empty (a special token): it is known by its id.
            self._call_ids = self._llm.tokenize(TOOL_CALL.encode(), add_bos=False,
                                                special=True)
        grammar = lib.llama_sampler_init_grammar(self._vocab, s.grammar.encode(), b"root")
        if not grammar:
            raise BadRequest("the answer's grammar does not parse")
        return grammar

    def _follow(self, job: _Job, token: int) -> None:
        """The grammar takes the answer's next token. llama.cpp aborts the whole process
        (a C++ exception through its C API) when a grammar is given a token it refuses, so
        it is given none: a token it refuses (a call written as its grammar does not
        allow, a resumed answer that went another way) ends the grammar, and the answer
        goes on free (the router still reads a call from the text). The triggers are
        matched here for the same reason (llama.cpp's lazy grammar feeds what follows a
        trigger to the grammar unchecked)."""
        grammar = job.grammar
        if job.triggers is None:
            if self._allowed(grammar, token):
                self._lib.llama_sampler_accept(grammar, token)
            else:
                self._drop_grammar(job, token)
            return
        piece = TOOL_CALL.encode() if self._call_ids == [token] else self._piece(token)
        job.seen += piece
        for trigger in job.triggers:
            if found := trigger.search(job.seen):
                captured, job.seen, job.triggers = job.seen[found.start():], b"", None
                for t in self._llm.tokenize(captured, add_bos=False, special=True):
                    self._follow(job, t)
                    if job.grammar is None:
                        break
                return
        if len(job.seen) > _SEEN_BYTES:  # a trigger anchored at the start can no longer match
            job.seen = job.seen[-64:]
            job.triggers = tuple(t for t in job.triggers if not t.pattern.startswith(rb"\A"))

    def _drop_grammar(self, job: _Job, token: int) -> None:
        log.info("lane %d: the answer left its grammar at token %d; it goes on unconstrained",
                 job.lane, token)
        self._lib.llama_sampler_free(job.grammar)
        job.grammar = None

    def _allowed(self, grammar: Any, token: int) -> bool:
        lib = self._lib
        one = lib.llama_token_data(token, 0.0, 0.0)
        candidates = lib.llama_token_data_array(ctypes.pointer(one), 1, -1, False)
        lib.llama_sampler_apply(grammar, ctypes.byref(candidates))
        return math.isfinite(one.logit)

    def _constrained(self, job: _Job, index: int) -> int:
        """The token the chain picks among those the grammar allows."""
        lib, n = self._lib, self._n_vocab
        data = (lib.llama_token_data * n)()
        view = np.frombuffer(data, dtype=[("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        view["id"] = np.arange(n, dtype=np.int32)
        view["logit"] = np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, index), (n,))
        candidates = lib.llama_token_data_array(data, n, -1, False)
        lib.llama_sampler_apply(job.grammar, ctypes.byref(candidates))
        lib.llama_sampler_apply(job.chain, ctypes.byref(candidates))
        return int(data[candidates.selected].id)

    def _chain(self, s: Sampling) -> Any:
        lib = self._lib
        chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        add = lambda sampler: lib.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if s.repeat_penalty != 1.0:
            add(lib.llama_sampler_init_penalties(self._n_vocab, 64, s.repeat_penalty, 0.0, 0.0))
        if s.temperature <= 0:
            add(lib.llama_sampler_init_greedy())
            return chain
        add(lib.llama_sampler_init_top_k(s.top_k))
        add(lib.llama_sampler_init_top_p(s.top_p, 1))
        add(lib.llama_sampler_init_min_p(s.min_p, 1))
        add(lib.llama_sampler_init_temp(s.temperature))
        add(lib.llama_sampler_init_dist(s.seed if s.seed is not None
                                        else random.getrandbits(32)))
        return chain

    def _make_room(self, lane: int, job: _Job) -> bool:
        """The answer has reached the end of the lane's cells: drop `room.block` tokens
        after the kept start and move the rest down (context shift). False if it may not."""
        room, held = job.room, self.tokens[lane]
        if room is None:
            return False
        n = min(room.block, len(held) - room.keep - 1)
        if n <= 0:
            return False
        lib, mem = self._lib, self._mem
        lib.llama_memory_seq_rm(mem, lane, room.keep, room.keep + n)
        lib.llama_memory_seq_add(mem, lane, room.keep + n, -1, -n)
        del held[room.keep:room.keep + n]
        job.dropped += n
        return True

    def _read(self, lane: int, tokens: Sequence[int], pos: int) -> None:
        """Evaluate `tokens` in `lane` from position `pos` on, without logits (between
        steps: the batch is free)."""
        for start in range(0, len(tokens), self._n_batch):
            part = tokens[start:start + self._n_batch]
            for i, token in enumerate(part):
                self._put(i, token, pos + start + i, lane, False)
            self._batch.n_tokens = len(part)
            rc = self._lib.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise PichatError(f"llama_decode failed ({rc})")

    def _truncate(self, lane: int, n: int) -> None:
        if n < len(self.tokens[lane]):
            self._lib.llama_memory_seq_rm(self._mem, lane, n, -1)
            del self.tokens[lane][n:]

    # --- lane state (engine thread, through `call`) ---------------------------------------

    def save(self, lane: int) -> SavedState:
        return save_seq(self._lib, self.ctx, lane, tuple(self.tokens[lane]), self.format)

    def restore(self, lane: int, state: SavedState) -> bool:
        self._truncate(lane, 0)
        if not load_seq(self._lib, self.ctx, lane, state, self.format):
            return False
        self.tokens[lane] = list(state.tokens)
        return True

    def adopt(self, lane: int, donor: int, prefix: Sequence[int]) -> int:
        """Make `lane` hold the start of `prefix` that `donor` holds, copied from the
        donor's cells. llama.cpp copies a whole lane's cells, at its next update: the copy
        is made to happen now, by decoding the last shared token again (no logits), so no
        later save or restore of `lane` can see the cells before the copy lands."""
        own = common_prefix(self.tokens[lane], prefix)
        n = common_prefix(self.tokens[donor], prefix)
        if lane == donor or n <= max(own, 1):
            return own
        lib = self._lib
        lib.llama_memory_seq_cp(self._mem, donor, lane, -1, -1)
        lib.llama_memory_seq_rm(self._mem, lane, n - 1, -1)
        self.tokens[lane] = self.tokens[donor][:n - 1]
        self._put(0, prefix[n - 1], n - 1, lane, False)
        self._batch.n_tokens = 1
        if lib.llama_decode(self.ctx, self._batch) != 0:
            self._truncate(lane, 0)
            return 0
        self.tokens[lane].append(prefix[n - 1])
        return n


    def splice(self, lane: int, prompt: Sequence[int]) -> int:
        """Make `lane` hold what it can of `prompt` beyond their common start by moving
        its cells (pichat/worker/engine/shift.py); how many tokens of `prompt` it then holds."""
        held = self.tokens[lane]
        plan = shift.plan(held, prompt) if self.can_shift else None
        if plan is None:
            return common_prefix(held, prompt)
        lib, mem = self._lib, self._mem
        remove = lambda p0, p1: lib.llama_memory_seq_rm(mem, lane, p0, p1)  # noqa: E731
        read = lambda tokens, pos: self._read(lane, tokens, pos)  # noqa: E731
        try:
            shift.apply(plan, remove=remove, read=read, prompt=prompt,
                        move=lambda p0, p1, d: lib.llama_memory_seq_add(mem, lane, p0, p1, d))
            shift.settle(plan, remove=remove, read=read, prompt=prompt)
        except PichatError:
            lib.llama_memory_seq_rm(mem, lane, -1, -1)
            self.tokens[lane] = []
            raise
        self.tokens[lane] = list(prompt[:plan.reused])
        return plan.reused


class Lane:
    """One sequence of a `BatchEngine`, as a slot's `Context`."""

    def __init__(self, engine: BatchEngine, index: int) -> None:
        self.engine = engine
        self.index = index

    def tokens(self) -> Sequence[int]:
        return list(self.engine.tokens[self.index])

    def save(self) -> SavedState:
        return self.engine.call(lambda: self.engine.save(self.index))

    def restore(self, state: SavedState) -> bool:
        return self.engine.call(lambda: self.engine.restore(self.index, state))

    def clear(self) -> None:
        self.engine.call(lambda: self.engine._truncate(self.index, 0))

    def truncate(self, n: int) -> None:
        self.engine.call(lambda: self.engine._truncate(self.index, n))

    def adopt(self, donor: Any, prefix: Sequence[int]) -> int:
        if not isinstance(donor, Lane) or donor.engine is not self.engine:
            return 0
        return self.engine.call(lambda: self.engine.adopt(self.index, donor.index, prefix))

    def splice(self, prompt: Sequence[int]) -> int:
        return self.engine.call(lambda: self.engine.splice(self.index, prompt))

    def generate(self, prompt: Sequence[int], sampling: Sampling, out: TextStream,
                 cancelled: threading.Event, resume: int = 0, room: Room | None = None
                 ) -> Generation:
        return self.engine.generate(self.index, prompt, sampling, out, cancelled, room, resume)
