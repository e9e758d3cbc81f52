"""Which worker a request goes to now, if any: pure functions over the scheduler's records.

`affinity`: a request whose session is warm on a worker goes there if it has a free slot;
if not, it waits until `spill_at` (re-reading a long history on a cold worker can cost
minutes on a Pi, so a short wait for the warm one usually wins), then spills to the least
loaded worker. A request that
names a preferred worker (one holding a prefix it shares) gets it while that worker's load
stays within the bound (`within_bound`). Otherwise the worker with the most free slots
(ties: the less loaded, the one holding fewer conversations). `round-robin`: the next
worker in turn with a free slot.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pichat.protocol import SessionId
from pichat.router.records import Job, SchedulerConfig, WorkerId, WorkerView

__all__ = ["place", "within_bound"]


def place(job: Job, workers: Mapping[WorkerId, WorkerView],
          affinity: Mapping[SessionId, WorkerId], config: SchedulerConfig, rr_next: int,
          now: float) -> tuple[WorkerId, bool, bool] | None:
    """(worker, affinity hit, spilled) for `job` now, or None to keep it waiting."""
    eligible = [w for w in workers.values()
                if not w.draining and w.id not in job.avoid
                and (job.model is None or w.model == job.model)]
    free = [w for w in eligible if w.free > 0]
    if config.policy == "round-robin":
        if not free:
            return None
        ordered = sorted(free, key=lambda w: w.order)
        pick = next((w for w in ordered if w.order >= rr_next), ordered[0])
        return pick.id, False, False
    home = affinity.get(job.session) if job.session is not None else None
    spilled = False
    if home is not None and home in workers and workers[home] in eligible:
        if workers[home].free > 0:
            return home, True, False
        if now < job.spill_at:
            return None
        spilled = True
    if not free:
        return None
    preferred = workers.get(job.prefer) if job.prefer is not None else None
    if preferred is not None and preferred in free and within_bound(preferred, eligible,
                                                                    config.prefix_load_factor):
        return preferred.id, False, spilled
    best = min(free, key=lambda w: (-w.free, w.busy / w.slots, w.warm, w.order))
    return best.id, False, spilled


def within_bound(view: WorkerView, eligible: list[WorkerView], load_factor: float) -> bool:
    """Would one more conversation keep `view` within the load bound?"""
    # Consistent hashing with bounded loads: a worker's share of the requests running and
    # of the conversations it holds (this one included) may exceed its share of the slots
    # by the load factor. Without the second, conversations arriving while a worker happens
    # to be idle would all make it their home.
    total_slots = sum(w.slots for w in eligible)
    factor = load_factor * view.slots / total_slots
    busy_cap = math.ceil(factor * (sum(w.busy for w in eligible) + 1))
    warm_cap = math.ceil(factor * (sum(w.warm for w in eligible) + 1))
    return view.busy + 1 <= busy_cap and view.warm + 1 <= warm_cap
