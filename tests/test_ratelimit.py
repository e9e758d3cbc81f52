"""Token buckets per key (pure: the caller gives the time)."""

from __future__ import annotations

from pichat.router.policy.ratelimit import RateLimit


def test_a_burst_then_the_rate_per_key():
    limit = RateLimit(rate=2.0, burst=3.0)
    assert [limit.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limit.allow("b", 0.0)             # another key has its own bucket
    assert not limit.allow("a", 0.4)         # 0.8 tokens back: not yet
    assert limit.allow("a", 0.5)             # one token back
    assert limit.refused == 2


def test_the_keys_remembered_are_bounded():
    limit = RateLimit(rate=1.0, burst=1.0, max_keys=100)
    for i in range(10_000):
        limit.allow(i, 0.0)
    assert len(limit._buckets) == 100
