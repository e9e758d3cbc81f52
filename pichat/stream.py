"""One streamed answer as its receiver sees it, and how the rest is asked for elsewhere.

Both ends that forward or read a stream use this one cursor: the router, when the worker
streaming an answer dies and another continues it (failover), and the client, when the
router falls silent mid-answer and it asks a new router for the rest. Resuming rests on
two facts kept here: the token ids the receiver has (every chunk carries those of its own
text), and how many chunks it has (the next source's chunks are numbered on from there).

Pure bookkeeping: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from pichat.protocol import Chunk, Done, Request, RequestId

__all__ = ["StreamCursor"]


@dataclass(slots=True)
class StreamCursor:
    request: Request
    """The request as first sent (its own continuation, if it had one, included)."""
    text: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    """The ids of the tokens of the text received so far."""
    chunks: int = 0
    """Chunks received (the receiver numbers them 0, 1, 2...)."""
    resumable: bool = True
    """Every chunk so far said which tokens it holds: the answer can go on elsewhere."""
    seq_base: int = 0
    """Chunks received before the current source took over (its seq 0 is this one)."""
    resumed: int = 0
    """Tokens the current source was given as a continuation."""
    resumes: int = 0
    """Times the answer moved to another source."""

    @property
    def expected_seq(self) -> int:
        """The `seq` the current source's next chunk must carry."""
        return self.chunks - self.seq_base

    @property
    def can_resume(self) -> bool:
        return self.resumable and len(self.tokens) < self.request.sampling.max_tokens

    def accept(self, chunk: Chunk) -> Chunk:
        """Record a chunk from the current source; returns it numbered as the receiver
        counts (the same object unless a resume shifted the numbering)."""
        self.text.append(chunk.text)
        self.tokens.extend(chunk.tokens)
        self.resumable = self.resumable and (bool(chunk.tokens) or not chunk.text)
        self.chunks += 1
        return replace(chunk, seq=self.seq_base + chunk.seq) if self.seq_base else chunk

    def resume(self, request_id: RequestId | None = None) -> Request:
        """The request for the rest of the answer, for a new source: the same
        conversation continued after the tokens received, with the token budget left
        (at least 1), under `request_id` (default: the same id)."""
        sampling = self.request.sampling
        self.seq_base = self.chunks
        self.resumed = len(self.tokens)
        self.resumes += 1
        return replace(
            self.request, id=request_id or self.request.id,
            continuation=self.request.continuation + tuple(self.tokens),
            sampling=replace(sampling, max_tokens=max(1, sampling.max_tokens - self.resumed)))

    def final(self, done: Done) -> Done:
        """The last source's DONE as if one source had answered it all: the tokens it was
        given count as generated, not as prompt; `failovers` counts the resumes."""
        if not self.resumes:
            return done
        return done.continued(self.resumed, self.resumes)
