"""Log lines a peer cannot blow up: texts clipped, repeated events aggregated.

Anything a peer controls (a field, an address, an error text) may be megabytes long and
arrive thousands of times a second. `clip` bounds one value; `Throttle` bounds the lines:
the first event of a kind is logged at once, the repeats within `window` seconds are only
counted, and one summary line per kind reports them (count, first and last detail) when
the window ends.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["clip", "Throttle"]


def clip(value: object, limit: int = 120) -> str:
    """`value` as text of at most about `limit` characters (repr for non-strings)."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} chars)"


@dataclass(slots=True)
class _Window:
    started: float
    level: int
    what: str
    repeats: int = 0
    first: str = ""
    last: str = ""


class Throttle:
    """`throttle.log(now, logging.WARNING, "refused", "refused a client from %s", addr,
    detail=addr)`: one line per kind per window, then a summary."""

    def __init__(self, logger: logging.Logger, window: float = 60.0, max_kinds: int = 256) -> None:
        self.logger = logger
        self.window = window
        self.max_kinds = max_kinds
        self._windows: OrderedDict[str, _Window] = OrderedDict()
        self.suppressed = 0
        """Lines held back in all (each also counted in a summary)."""

    def log(self, now: float, level: int, kind: str, message: str, *args: object,
            detail: str = "") -> None:
        window = self._windows.get(kind)
        if window is not None and now - window.started < self.window:
            window.repeats += 1
            window.last = clip(detail, 80)
            window.first = window.first or window.last
            self.suppressed += 1
            return
        if window is not None:
            self._summarise(kind, window, now)
        self.logger.log(level, message, *args)
        self._windows[kind] = _Window(now, level, clip(message % args if args else message, 80))
        self._windows.move_to_end(kind)
        while len(self._windows) > self.max_kinds:
            old_kind, old = self._windows.popitem(last=False)
            self._summarise(old_kind, old, now)

    def flush(self, now: float) -> None:
        """Report the windows that have ended (call it every few seconds)."""
        for kind, window in list(self._windows.items()):
            if now - window.started >= self.window:
                del self._windows[kind]
                self._summarise(kind, window, now)

    def _summarise(self, kind: str, window: _Window, now: float) -> None:
        if window.repeats:
            span = f" (first {window.first}, last {window.last})" if window.first else ""
            self.logger.log(window.level, "%d more like \"%s\" in %.0fs%s", window.repeats,
                            window.what, now - window.started, span)
