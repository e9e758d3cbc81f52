"""Log lines a peer cannot blow up or forge: texts clipped, escaped, repeated events
aggregated.

Anything a peer controls (a field, an address, an error text) may be megabytes long,
carry newlines that would write whole forged lines, and arrive thousands of times a
second. `clip` bounds one value; `OneLine` (the formatter every pichat daemon logs with)
escapes control, line-separator and bidi characters in every message, whatever value put
them there, so one event is one line; `Throttle` bounds the lines: the first event of a
kind is logged at once, the repeats within `window` seconds are only counted, and one
summary line per kind reports them (count, first and last detail) when the window ends.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["clip", "escape", "OneLine", "Throttle"]

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def escape(text: str) -> str:
    """`text` with every character that could end a line, hide text or reorder it on a
    terminal written as an escape (a newline is `\\x0a`)."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100
                       else f"\\u{ord(m[0]):04x}", text)


class OneLine(logging.Formatter):
    """A formatter that escapes each record's message (`escape`): a value from the
    network cannot write a line of its own. Tracebacks (our own) keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = escape(record.message)
        return super().formatMessage(record)


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
