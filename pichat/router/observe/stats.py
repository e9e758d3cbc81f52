"""The router's counts: every event counted once, here. `pichat status` (the snapshot) and
`/metrics` (pichat/router/observe/metrics.py) both read this one object, so they cannot disagree.

Pure: plain counters, no I/O.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from pichat.protocol import Usage
from pichat.router.policy.scheduler import Placement

__all__ = ["Stats"]


@dataclass(slots=True)
class Stats:
    outcomes: Counter[str] = field(default_factory=Counter)
    """How requests ended: "completed", "cancelled", or the error code they failed with."""
    placements: Counter[Placement] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    """Client messages refused before they became requests, by reason."""
    http_errors: Counter[int] = field(default_factory=Counter)
    events: Counter[str] = field(default_factory=Counter)
    """Everything else worth counting (requests, workers_lost, stale_results, ...)."""
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    def completed(self, usage: Usage) -> None:
        self.outcomes["completed"] += 1
        self.prompt_tokens += usage.prompt_tokens
        self.cached_tokens += usage.cached_tokens
        self.completion_tokens += usage.completion_tokens

    @property
    def cache_hit_share(self) -> float:
        return round(self.cached_tokens / self.prompt_tokens, 4) if self.prompt_tokens else 0.0

    def as_status(self) -> dict[str, Any]:
        """The flat counters of `pichat status --json` ("requests")."""
        out: dict[str, Any] = dict(self.events)
        for outcome, n in self.outcomes.items():
            out[outcome if outcome in ("completed", "cancelled") else f"failed_{outcome}"] = n
        out.update({f"rejected_{reason}": n for reason, n in self.rejected.items()})
        out.update({f"http_{status}": n for status, n in self.http_errors.items()})
        p = self.placements
        out.update(affinity_hits=p[Placement.AFFINITY], prefix_hits=p[Placement.PREFIX],
                   spills=p[Placement.SPILL], retries=p[Placement.RETRY],
                   failovers=p[Placement.FAILOVER], placed_by_load=p[Placement.LOAD],
                   prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                   completion_tokens=self.completion_tokens,
                   cache_hit_share=self.cache_hit_share)
        return dict(sorted(out.items()))
