"""Which worker a request goes to now, if any: pure functions over the scheduler's records.

`affinity`: a request whose session is warm on a worker goes there if it has a free slot;
if not, it waits for it unless a free worker is expected to start it sooner, counting what
bringing the conversation there costs (its state moved, or its history read again: on a
Pi, minutes for a long one); the scheduler weighs that (pichat/router/policy/costs.py) and a
request waits no longer than `spill_at` in any case. A request that names a preferred
worker (one holding a prefix it shares) gets it while that worker's load stays within the
bound (`within_bound`). Otherwise the worker with the most free slots (ties: the less
loaded, the one holding fewer conversations). `round-robin`: the next worker in turn with
a free slot.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

from pichat.protocol import SessionId
from pichat.router.policy.records import Job, SchedulerConfig, WorkerId, WorkerView

__all__ = ["place", "within_bound"]


def place(job: Job, workers: Mapping[WorkerId, WorkerView],
          affinity: Mapping[SessionId, WorkerId], config: SchedulerConfig, rr_next: int,
          now: float, spill_pays: Callable[[WorkerView, WorkerView], bool] | None = None,
          ) -> tuple[WorkerId, bool, bool] | None:
    """(worker, affinity hit, spilled) for `job` now, or None to keep it waiting.

    `spill_pays(home, other)`: is `other` (free now) expected to start the job sooner than
    its busy warm worker `home`? None: nothing is known; wait until `job.spill_at`."""
    eligible = [w for w in workers.values()
                if not w.draining and w.id not in job.avoid
                and (job.model is None or w.model == job.model)
                and (job.embed or not w.embedding_only)]
    free = [w for w in eligible if w.free > 0]
    if config.policy == "round-robin":
        if not free:
            return None
        ordered = sorted(free, key=lambda w: w.order)
        pick = next((w for w in ordered if w.order >= rr_next), ordered[0])
        return pick.id, False, False
    home_id = affinity.get(job.session) if job.session is not None else None
    home = workers.get(home_id) if home_id is not None else None
    if home is not None and home not in eligible:
        home = None  # draining, refused it, another model: it goes elsewhere at once
    if home is not None and home.free > 0:
        return home.id, True, False
    if not free:
        return None
    preferred = workers.get(job.prefer) if job.prefer is not None else None
    if preferred is not None and preferred in free and within_bound(preferred, eligible,
                                                                    config.prefix_load_factor):
        pick = preferred
    else:
        pick = min(free, key=lambda w: (-w.free, w.busy / w.slots, w.warm, w.order))
    if home is None:
        return pick.id, False, False
    if now >= job.spill_at or (spill_pays is not None and spill_pays(home, pick)):
        return pick.id, False, True
    return None


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
