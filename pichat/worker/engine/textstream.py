"""From generated tokens to the CHUNKs a worker sends.

Four jobs, in order:
1. decode UTF-8 incrementally (a character may span several tokens);
2. find the request's stop strings, holding back any tail that could be the start of
   one, so a stop string is never sent, even in part;
3. coalesce: the first text goes out at once (time to first token), then a chunk every
   `flush_tokens` tokens or `flush_interval` seconds, whichever comes first. Per-message
   cost dominates a broker's work, so fewer, larger chunks carry far more tokens;
4. keep text and tokens aligned: a chunk is cut only where every token pushed so far is
   wholly in the text sent (no half character buffered, nothing held back), and carries
   those tokens' ids. If the worker dies, another can continue the answer from exactly the
   tokens the client has, none lost or repeated.
"""

from __future__ import annotations

import codecs
import time
from collections.abc import Callable, Sequence

__all__ = ["TextStream"]


class TextStream:
    """Not thread-safe: one generation thread pushes, `emit(text, tokens)` is called from it."""

    def __init__(self, emit: Callable[[str, tuple[int, ...]], None], *,
                 stop: Sequence[str] = (), flush_tokens: int = 16, flush_interval: float = 0.05,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._flush_tokens = max(1, flush_tokens)
        self._flush_interval = flush_interval
        self._clock = clock
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        """Decoded text held back: it could be the start of a stop string."""
        self._ready: list[str] = []
        """Text cleared for sending, waiting for the next flush."""
        self._tokens: list[int] = []
        """Ids of the tokens pushed since the last flush."""
        self._last_flush: float | None = None
        self._sent: list[str] = []
        self.stopped = False

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._sent)

    def push(self, piece: bytes, token: int = 0) -> bool:
        """Add one token (its bytes and id). True when a stop string was found:
        generation must end."""
        if self.stopped:
            return True
        self._tokens.append(token)
        self._pending += self._decoder.decode(piece)
        if self._stop:
            self._check_stop()
        else:
            self._ready.append(self._pending)
            self._pending = ""
        self._maybe_flush()
        return self.stopped

    def close(self) -> None:
        """The generation ended: send everything that is left."""
        if not self.stopped:
            self._pending += self._decoder.decode(b"", final=True)
            if self._stop:
                self._check_stop(final=True)
            self._ready.append(self._pending)
            self._pending = ""
        self._flush()

    def _check_stop(self, final: bool = False) -> None:
        text = self._pending
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self._ready.append(text[:cut])
            self._pending = ""
            self.stopped = True
            return
        if final:
            return
        # Keep back the longest tail that is a prefix of some stop string.
        keep = 0
        for n in range(min(self._hold, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stop):
                keep = n
                break
        self._ready.append(text[: len(text) - keep])
        self._pending = text[len(text) - keep:]

    def _maybe_flush(self) -> None:
        if self.stopped or self._pending or self._decoder.getstate()[0]:
            return  # not on a clean token boundary: some token's text is not out yet
        now = self._clock()
        if (
            self._last_flush is None
            or len(self._tokens) >= self._flush_tokens
            or now - self._last_flush >= self._flush_interval
        ):
            if self._flush():
                self._last_flush = now

    def _flush(self) -> bool:
        text = "".join(self._ready)
        self._ready.clear()
        if not text and not self._tokens:
            return False
        tokens, self._tokens = tuple(self._tokens), []
        self._sent.append(text)
        self._emit(text, tokens)
        return True
