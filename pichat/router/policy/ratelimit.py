"""Token buckets per key, bounded in the keys they remember (pure: the caller gives `now`)."""

from __future__ import annotations

from collections import OrderedDict

__all__ = ["RateLimit"]


class RateLimit:
    """`allow(key, now)`: True for at most `burst` events at once and `rate` per second
    after that, per key. Remembers at most `max_keys` keys (least recently seen dropped,
    which at worst forgives a key its debt)."""

    def __init__(self, rate: float, burst: float, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self.refused = 0
        self._buckets: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def allow(self, key: object, now: float) -> bool:
        tokens, stamp = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        else:
            self.refused += 1
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return allowed
