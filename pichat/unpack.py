"""msgpack decoding whose cost is bounded before it is paid.

Why: msgpack is compact enough that a few bytes become a Python object (an empty array is
one byte and a 56-byte list). Measured here, a 4 MB body of empty arrays decodes into
~256 MB of objects and takes seconds; a peer that sends a few of those stalls the router's
loop long enough for live workers to be declared dead. A limit on message bytes does not
bound that; a limit on what a body may decode to does.

`unpack(body, limits)` returns what `msgpack.unpackb` would, or raises `DecodeError`
naming the limit crossed:

- A body of at most `FAST_BYTES` is decoded in one C call: every msgpack object takes at
  least one byte, so it cannot decode to more than `FAST_BYTES` objects (~2 MB, ~2 ms).
- A bigger body is walked: containers are opened one header at a time and their sizes
  charged to the budget *before* their elements are built, so decoding stops at the
  first object past `limits.objects` (containers, strings, numbers), `limits.ints`
  (integers inside arrays of integers: token ids) or `limits.depth`. Strings are bounded by
  `limits.max_str` inside msgpack's C code. Arrays that hold only small non-negative
  integers (token ids) are recognised from their bytes (a regular expression over their
  span, in C) and decoded in one C call, so a long continuation costs little.

The whole body is still in memory (ZeroMQ delivered it); what is bounded is what Python
builds from it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import msgpack

__all__ = ["FAST_BYTES", "Limits", "DecodeError", "unpack"]

FAST_BYTES = 16 * 1024
"""Bodies up to this size are decoded in one C call (at most this many objects)."""

_INT_ARRAY = re.compile(
    rb"(?:[\x90-\x9f]|\xdc[\x00-\xff]{2}|\xdd[\x00-\xff]{4})"  # an array header
    rb"(?:[\x00-\x7f]|\xcc[\x00-\xff]|\xcd[\x00-\xff]{2}|\xce[\x00-\xff]{4})*")  # uints
"""An array made only of unsigned integers below 2**32. The first byte of each msgpack
encoding decides its length, so these bytes tokenize exactly as msgpack parses them."""


class DecodeError(ValueError):
    """The body is not msgpack, or it decodes to more than its limits allow."""


@dataclass(frozen=True, slots=True)
class Limits:
    """What one body may decode to."""

    objects: int = 1024
    """Maps, arrays, strings, binaries, floats, booleans and integers outside int arrays
    (a map of n pairs counts n + 1 for itself and its keys, and then its values)."""
    ints: int = 0
    """Integers inside arrays of integers (token ids)."""
    depth: int = 8
    """Containers within containers."""
    max_str: int = 4 << 20
    """Characters of one string (bytes of one binary)."""


def unpack(body: bytes, limits: Limits) -> Any:
    """Decode `body` within `limits` (see the module's docstring)."""
    try:
        if len(body) <= FAST_BYTES:
            return msgpack.unpackb(body, raw=False, strict_map_key=True,
                                   max_str_len=limits.max_str, max_bin_len=limits.max_str,
                                   max_ext_len=limits.max_str)
        return _Walk(body, limits).run()
    except DecodeError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise DecodeError(f"not valid msgpack ({type(exc).__name__}: {str(exc)[:80]})") from None


_MAP_HEADERS = frozenset((*range(0x80, 0x90), 0xDE, 0xDF))
_ARRAY_HEADERS = frozenset((*range(0x90, 0xA0), 0xDC, 0xDD))
_CONTAINER_HEADERS = _MAP_HEADERS | _ARRAY_HEADERS


_UINT_HEADS = frozenset((*range(0x80), 0xCC, 0xCD, 0xCE))


def _array_header(body: bytes, pos: int) -> tuple[int, int]:
    """(elements, offset of the first element) of the array header at `pos`."""
    head = body[pos]
    if head <= 0x9F:
        return head & 0x0F, pos + 1
    width = 2 if head == 0xDC else 4
    return int.from_bytes(body[pos + 1:pos + 1 + width], "big"), pos + 1 + width


class _Walk:
    def __init__(self, body: bytes, limits: Limits) -> None:
        self.body = body
        self.limits = limits
        self.objects = limits.objects
        self.ints = limits.ints
        self.u = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(body),
                                  max_str_len=limits.max_str, max_bin_len=limits.max_str,
                                  max_ext_len=limits.max_str)
        self.u.feed(body)

    def run(self) -> Any:
        value = self.value(0)
        if self.u.tell() != len(self.body):
            raise DecodeError("extra bytes after the body")
        return value

    def spend(self, n: int) -> None:
        self.objects -= n
        if self.objects < 0:
            raise DecodeError(f"decodes to more than {self.limits.objects} objects")

    def value(self, depth: int) -> Any:
        pos = self.u.tell()
        if pos >= len(self.body):
            raise DecodeError("truncated")
        head = self.body[pos]
        if head in _MAP_HEADERS:
            return self.map(depth + 1)
        if head in _ARRAY_HEADERS:
            return self.array(pos, depth + 1)
        self.spend(1)
        return self.u.unpack()

    def nest(self, depth: int) -> None:
        if depth > self.limits.depth:
            raise DecodeError(f"nested deeper than {self.limits.depth} levels")

    def map(self, depth: int) -> dict[Any, Any]:
        self.nest(depth)
        n = self.u.read_map_header()
        self.spend(1 + n)  # the map and its keys; each value is counted as it is read
        out: dict[str, Any] = {}
        for _ in range(n):
            if self.body[self.u.tell()] in _CONTAINER_HEADERS:
                raise DecodeError("a map key is a container")
            key = self.u.unpack()
            if not isinstance(key, str):
                raise DecodeError("a map key is not a string")
            out[key] = self.value(depth)
        return out

    def array(self, pos: int, depth: int) -> list[Any]:
        self.nest(depth)
        n, first = _array_header(self.body, pos)
        if n > max(self.objects, self.ints):
            raise DecodeError(f"an array of {n} elements is over the limits "
                              f"({self.limits.objects} objects, {self.limits.ints} integers)")
        if n > 1 and first < len(self.body) and self.body[first] in _UINT_HEADS \
                and self._only_uints(pos, n):
            self.spend(1)
            self.ints -= n
            if self.ints < 0:
                raise DecodeError(f"holds more than {self.limits.ints} integers in arrays")
            return self.u.unpack()  # in C: it holds only integers
        self.u.read_array_header()
        self.spend(1)  # each element is counted as it is read
        return [self.value(depth) for _ in range(n)]

    def _only_uints(self, pos: int, n: int) -> bool:
        """Whether the array at `pos` (of `n` elements) holds only unsigned integers below
        2**32: such an array spans at most 5 bytes per element; skip it in C within that
        window to find its end, then match its bytes."""
        window = memoryview(self.body)[pos:pos + 5 + 5 * n]
        skip = msgpack.Unpacker(max_buffer_size=len(window))
        skip.feed(window)
        try:
            skip.skip()
        except msgpack.OutOfData:
            return False  # longer than 5 bytes per element: not only integers
        return _INT_ARRAY.fullmatch(self.body, pos, pos + skip.tell()) is not None


def json_object(raw: bytes | None, max_bytes: int) -> dict[str, Any] | None:
    """A JSON object of at most `max_bytes` (a record another router left in the shared
    store), or None if it is anything else."""
    if not raw or len(raw) > max_bytes:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    return found if isinstance(found, dict) else None
