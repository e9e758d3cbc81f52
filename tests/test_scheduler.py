"""The routing policy as a table: each case is a script of events and the actions each
must produce, written compactly:

    "worker A 2"          A registers with 2 slots (at t=0, model "m")
    "worker A 1 m2"       ... serving model m2
    "worker A 1 m s1,s2"  ... and announcing warm sessions s1, s2
    "submit r1 s1 @3"     request r1 of session s1 at t=3 ("-" for no session)
    "submit r1 s1 m2 @3"  ... asking for model m2
    "submit r1 - @3 >A"   ... preferring worker A (a shared prefix)
    "submit r1 - @3 %bob" ... from owner bob (default: one owner for all)
    "finish r1 @4"        the worker ended r1
    "chunk r1"            the first chunk of r1 arrived ("chunk r1 plain": without token ids)
    "bounce r1 @4"        the worker refused r1 before starting it (draining, resetting)
    "full r1 @4"          ... because all its slots are taken (by another router's requests)
    "busy A 1 @5"         A's heartbeat says 1 of its slots is in use
    "drain A"             A is draining
    "cancel r1 @4"        the client cancelled r1
    "beat A @2"           a heartbeat from A
    "evict A s1"          A dropped s1 from its cache
    "tick @6"             time passes

Sizes and speeds, for the cost of a spill (pichat/router/policy/costs.py), as key=value words:

    "worker A 1 kv=100000:f"     A's states take 100,000 bytes per token, format "f"
    "speed A 100 20"             A reads 100 prompt tokens/s and writes 20 tokens/s
    "submit r1 s1 chars=600"     r1's conversation has 600 characters
    "finish r1 usage=2000+32"    r1's prompt was 2,000 tokens and its answer 32
    "chunk r1 tokens=100"        a chunk of 100 tokens

and the actions:  "r1->A" dispatch, "r1->A hit" (affinity), "r1->A prefix" (the preferred
worker), "r1->B spill", "r1->B retry", "r1->B failover" (continue a streamed answer),
"fail r1 busy", "cancel r1@A", "dead A".
"""

from __future__ import annotations

import pytest

from pichat.protocol import RequestId, SessionId, Usage
from pichat.router.policy.costs import Speed
from pichat.router.policy.scheduler import (
    CancelOnWorker,
    Dispatch,
    Fail,
    Placement,
    Scheduler,
    SchedulerConfig,
    WorkerDead,
    WorkerId,
)


def _long_history_on_busy_a(b_format: str) -> list[tuple[str, list[str]]]:
    """s1 holds 2,032 tokens on A (100,000 bytes each, format f), which is busy for ~5.6 s
    more; B (states of `b_format`) is free."""
    return [
        ("worker A 1 kv=100000:f", []), (f"worker B 1 kv=100000:{b_format}", []),
        ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=6600 @0", ["r1->A"]),
        ("finish r1 @1 usage=2000+32", []),
        ("submit r2 s2 chars=150 @1", ["r2->B"]),
        ("finish r2 @2 usage=50+32", []),
        ("submit r3 s3 chars=300 @2 >A", ["r3->A prefix"]),
    ]


CASES: dict[str, tuple[dict, list[tuple[str, list[str]]]]] = {
    "a new session goes to the worker with the most free slots": ({}, [
        ("worker A 1", []), ("worker B 2", []),
        ("submit r1 s1 @0", ["r1->B"]),
        ("submit r2 s2 @0", ["r2->A"]),  # tie on free slots: the less loaded one
        ("submit r3 s3 @0", ["r3->B"]),
    ]),
    "ties go to the worker with fewer warm sessions": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("finish r1 @1", []),
        ("submit r2 s2 @1", ["r2->B"]),
    ]),
    "affinity hit: a returning session goes back to its worker": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("finish r1 @1", []),
        ("submit r2 s2 @1", ["r2->B"]), ("finish r2 @2", []),
        ("submit r3 s2 @2", ["r3->B hit"]),
        ("submit r4 s1 @2", ["r4->A hit"]),
    ]),
    "affinity worker busy: wait, then spill, and the affinity moves": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("finish r1 @1", []),
        ("submit r2 s2 @1", ["r2->B"]), ("finish r2 @2", []),
        ("submit r3 s3 @2", ["r3->A"]),
        ("submit r4 s1 @2", []),          # s1 is warm on A, which is busy: wait
        ("tick @6.9", []),
        ("tick @7", ["r4->B spill from A"]),     # waited 5 s: spill to the free worker
        ("finish r4 @8", []), ("finish r3 @8", []),
        ("submit r5 s1 @8", ["r5->B hit"]),
    ]),
    "affinity worker frees up before the wait ends": ({"affinity_wait": 5}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("finish r1 @1", []),
        ("submit r2 s2 @1", ["r2->B"]), ("finish r2 @1", []),
        ("submit r3 s3 @1", ["r3->A"]),
        ("submit r4 s1 @2", []),
        ("finish r3 @3", ["r4->A hit"]),
    ]),
    "a waiting request does not block others behind it": ({"affinity_wait": 5}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]),
        ("submit r2 s1 @0", []),            # waits for A
        ("submit r3 s9 @0", ["r3->B"]),     # goes past it to the free worker
    ]),
    "every slot busy: requests queue, oldest first": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("submit r2 - @0", []), ("submit r3 - @0", []),
        ("finish r1 @1", ["r2->A"]),
        ("finish r2 @2", ["r3->A"]),
    ]),
    "queue bound: past it, busy at once": ({"queue_limit": 1}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("submit r2 - @0", []),
        ("submit r3 - @0", ["fail r3 busy"]),
    ]),
    "queue timeout": ({"queue_timeout": 10}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]), ("beat A @2", []),
        ("submit r2 - @1", []),
        ("beat A @4", []), ("beat A @6", []), ("beat A @8", []), ("beat A @10", []),
        ("tick @10.9", []),
        ("tick @11", ["fail r2 timeout"]),
    ]),
    "request deadline: the client is answered, the worker told to stop": ({"request_timeout": 3}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("submit r2 - @0", []),
        ("beat A @2", []),
        ("tick @3", ["fail r1 timeout", "cancel r1@A", "fail r2 timeout"]),
    ]),
    "the slot of a timed-out request stays busy until the worker confirms": (
        {"request_timeout": 3}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]), ("beat A @2", []),
        ("tick @3", ["fail r1 timeout", "cancel r1@A"]),
        ("submit r2 - @3", []),
        ("finish r1 @3.5", ["r2->A"]),
    ]),
    "no workers: fail at once": ({}, [
        ("submit r1 s1 @0", ["fail r1 no_workers"]),
    ]),
    "just started: wait a grace period for workers to register": ({"startup_grace": 5}, [
        ("submit r1 s1 @0", []),
        ("submit r2 - @1", []),
        ("worker A 1 @2", ["r1->A"]),
        ("beat A @4", []),
        ("tick @5", ["fail r2 timeout"]),  # a worker came, but its slot stayed busy
        ("finish r1 @6", []),
        ("submit r3 - @6", ["r3->A"]),
    ]),
    "just started and no worker came: no_workers when the grace ends": ({"startup_grace": 5}, [
        ("submit r1 s1 @0", []),
        ("tick @4.9", []),
        ("tick @5", ["fail r1 no_workers"]),
        ("submit r2 - @5", ["fail r2 no_workers"]),
    ]),
    "a request naming a model goes to a worker serving it": ({}, [
        ("worker A 1 m1", []), ("worker B 1 m2", []),
        ("submit r1 - m2 @0", ["r1->B"]),
        ("submit r2 - m2 @0", []),
        ("submit r3 - m3 @0", ["fail r3 no_workers"]),
        ("submit r4 - @0", ["r4->A"]),
    ]),
    "dead worker: requests not yet streamed are re-dispatched": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]),
        ("beat B @2", []),
        ("tick @3", ["dead A", "r1->B retry"]),
        ("submit r2 s1 @3", []),  # affinity moved to B with the retry
    ]),
    "dead worker: a streamed answer continues on another worker": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("chunk r1", []),
        ("beat B @2", []),
        ("tick @3", ["dead A", "r1->B failover"]),
    ]),
    "dead worker: an answer without token ids cannot continue: worker_lost": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 s1 @0", ["r1->A"]), ("chunk r1 plain", []),
        ("beat B @2", []),
        ("tick @3", ["dead A", "fail r1 worker_lost"]),
        ("submit r2 s1 @3", ["r2->B"]),  # no stale affinity to the dead worker
    ]),
    "failovers are bounded": ({"max_failovers": 1}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 - @0", ["r1->A"]), ("chunk r1", []),
        ("beat B @2", []),
        ("tick @3", ["dead A", "r1->B failover"]),
        ("chunk r1", []),
        ("worker C 1 @4", []),
        ("beat C @6", []),
        ("tick @6", ["dead B", "fail r1 worker_lost"]),
    ]),
    "a draining worker finishes its work but gets nothing new": ({}, [
        ("worker A 2", []), ("worker B 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("drain A", []),
        ("submit r2 - @0", ["r2->B"]),
        ("submit r3 - @0", []),            # A has a free slot, but drains
        ("finish r2 @1", ["r3->B"]),
        ("drain B", []),
        ("submit r4 - @1", ["fail r4 no_workers"]),
    ]),
    "a refused request goes to another worker": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("drain A", []),
        ("bounce r1 @1", ["r1->B retry"]),
    ]),
    "a refused request avoids that worker until it registers again": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("bounce r1 @1", []),              # A refused it: it waits for another worker
        ("worker A 1 @2", ["dead A", "r1->A retry"]),  # A registered afresh: it may now
    ]),
    "a request refused again and again fails with busy": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("bounce r1 @1", []),
        ("worker A 1 @1", ["dead A", "r1->A retry"]),
        ("bounce r1 @1", []),
        ("worker A 1 @1", ["dead A", "r1->A retry"]),
        ("bounce r1 @1", []),
        ("worker A 1 @1", ["dead A", "r1->A retry"]),
        ("bounce r1 @1", ["fail r1 busy"]),
    ]),
    "a worker full with another router's requests takes ours when its slots free": ({}, [
        # Two routers place on the same workers: ours thinks A and B free, they are not.
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("full r1 @0", ["r1->B retry"]),   # A is full: not tried again for now
        ("full r1 @0", []),                # B too: r1 waits, neither failed nor avoided
        ("submit r2 - @0", []),            # nor is any other request sent to them
        ("busy A 1 @1", []),               # the heartbeat: still full
        ("busy B 0 @1", ["r1->B retry"]),  # a slot freed on B: r1 goes first
        ("busy A 0 @1", ["r2->A"]),
    ]),
    "a heartbeat alone never holds a request back": ({}, [
        ("worker A 2", []),
        ("submit r1 - @0", ["r1->A"]),
        ("busy A 1 @1", []),               # r1 itself
        ("submit r2 - @1", ["r2->A"]),     # one slot still free
        ("busy A 2 @2", []),
        ("submit r3 - @2", []),
        ("finish r1 @3", ["r3->A"]),
        ("finish r2 @4", []),
        ("busy A 2 @4", []),               # sent before r2's slot was released
        ("submit r4 - @4", ["r4->A"]),     # not counted as another router's
    ]),
    "dead worker's re-dispatched request waits for a slot at the head of the queue": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 - @0", ["r1->A"]), ("submit r2 - @0", ["r2->B"]),
        ("submit r3 - @1", []),
        ("beat B @2.5", []),
        ("tick @3", ["dead A"]),
        ("finish r2 @4", ["r1->B retry"]),
    ]),
    "heartbeats keep a worker alive": ({}, [
        ("worker A 1", []),
        ("beat A @2", []),
        ("tick @4.9", []),
        ("tick @5", ["dead A"]),
    ]),
    "cancel while queued: dropped, nothing sent": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]), ("submit r2 - @0", []),
        ("cancel r2 @1", []),
        ("finish r1 @2", []),
    ]),
    "cancel while running: the worker is told; its slot frees when it confirms": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("cancel r1 @1", ["cancel r1@A"]),
        ("cancel r1 @1", []),
        ("submit r2 - @1", []),
        ("finish r1 @2", ["r2->A"]),
    ]),
    "a worker announcing warm sessions gets them back": ({}, [
        ("worker A 1", []), ("worker B 3 m s7", []),
        ("submit r1 s7 @0", ["r1->B hit"]),
    ]),
    "evicted sessions lose their affinity": ({}, [
        ("worker A 1", []), ("worker B 2", []),
        ("submit r1 s1 @0", ["r1->B"]), ("finish r1 @1", []),
        ("evict B s1", []),
        ("submit r2 s2 @1", ["r2->B"]),
        ("submit r3 s1 @1", ["r3->A"]),  # placed by load, not affinity
    ]),
    "a worker re-registering loses what it was running": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("worker A 1", ["dead A", "r1->A retry"]),
    ]),
    "a shared prefix prefers its worker, within a bounded load": ({}, [
        ("worker A 4", []), ("worker B 4", []),
        ("submit r1 - @0 >A", ["r1->A prefix"]),
        ("submit r2 - @0 >A", ["r2->A prefix"]),
        ("submit r3 - @0 >A", ["r3->B"]),         # A would hold 3 of 3: over 1.25 x its share
        ("submit r4 - @0 >A", ["r4->A prefix"]),
        ("submit r5 - @0 >A", ["r5->A prefix"]),
        ("submit r6 - @0 >A", ["r6->B"]),
    ]),
    "conversations sharing a prefix spread even when its worker is idle": ({}, [
        ("worker A 2", []), ("worker B 2", []),
        ("submit r1 s1 @0 >A", ["r1->A prefix"]), ("finish r1 @0", []),
        ("submit r2 s2 @0 >A", ["r2->A prefix"]), ("finish r2 @0", []),
        ("submit r3 s3 @0 >A", ["r3->B"]),  # A holds 2 of 3 conversations: its bound
        ("finish r3 @0", []),
        ("submit r4 s4 @0 >A", ["r4->A prefix"]), ("finish r4 @0", []),
        ("submit r5 s5 @0 >A", ["r5->A prefix"]), ("finish r5 @0", []),
        ("submit r6 s6 @0 >A", ["r6->B"]),
    ]),
    "a session's own worker beats a preferred one": ({}, [
        ("worker A 2", []), ("worker B 2", []),
        ("submit r1 s1 @0", ["r1->A"]), ("finish r1 @1", []),
        ("submit r2 s1 @1 >B", ["r2->A hit"]),
    ]),
    "a preferred worker that is full is passed over without waiting": ({}, [
        ("worker A 1", []), ("worker B 1", []),
        ("submit r1 - @0 >A", ["r1->A prefix"]),
        ("submit r2 - @0 >A", ["r2->B"]),
    ]),
    "owners take turns for a freed slot": ({}, [
        ("worker A 1", []),
        ("submit r1 - @0 %hog", ["r1->A"]),
        ("submit r2 - @0 %hog", []), ("submit r3 - @0 %hog", []),
        ("submit r4 - @1 %ann", []),          # behind the hog's two, but ann's turn is next
        ("finish r1 @2", ["r4->A"]),
        ("submit r5 - @2 %ann", []),
        ("finish r4 @3", ["r2->A"]),          # then the hog's oldest
        ("finish r2 @4", ["r5->A"]),
        ("finish r5 @5", ["r3->A"]),
    ]),
    "a full queue makes room for an owner with a smaller share": ({"queue_limit": 3}, [
        ("worker A 1", []),
        ("submit r1 - @0 %hog", ["r1->A"]),
        ("submit r2 - @0 %hog", []), ("submit r3 - @0 %hog", []), ("submit r4 - @0 %hog", []),
        ("submit r5 - @0 %hog", ["fail r5 busy"]),   # alone it may fill the queue, not more
        ("submit r6 - @1 %ann", ["fail r4 busy"]),   # the hog's newest makes room
        ("submit r7 - @1 %ann", ["fail r7 busy"]),   # shares even: 2 and 1
        ("finish r1 @2", ["r6->A"]),
        ("submit r8 - @2 %ann", []),
        ("finish r6 @3", ["r2->A"]),
    ]),
    "an owner's running and queued requests can be capped": (
        {"owner_max_running": 1, "owner_max_queued": 1}, [
        ("worker A 2", []),
        ("submit r1 - @0 %hog", ["r1->A"]),
        ("submit r2 - @0 %hog", []),                 # a slot is free, but hog runs one
        ("submit r3 - @0 %hog", ["fail r3 busy"]),   # and has one waiting
        ("submit r4 - @0 %ann", ["r4->A"]),
        ("finish r1 @1", ["r2->A"]),
    ]),
    "a worker that ignores a cancel loses the slot after the grace": (
        {"cancel_grace": 10, "worker_expiry": 100}, [
        ("worker A 1", []),
        ("submit r1 - @0", ["r1->A"]),
        ("cancel r1 @1", ["cancel r1@A"]),
        ("submit r2 - @1", []),
        ("tick @10.9", []),
        ("tick @11", ["r2->A"]),
        ("finish r1 @12", []),                       # a late answer changes nothing
        ("submit r3 - @12", []),
        ("finish r2 @13", ["r3->A"]),
    ]),
    "a worker back from a restart claims only the sessions no live worker holds": (
        {"worker_expiry": 5}, [
        ("worker A 1 m s1,s2 @0", []),
        ("worker B 1 @0", []),
        ("beat B @4", []),
        ("tick @5.5", ["dead A"]),
        ("submit r1 s1 @6", ["r1->B"]),              # s1 goes on on B
        ("finish r1 @7", []),
        ("worker A 1 m s1,s2 @8", []),               # A's disk still has both
        ("submit r2 s1 @9", ["r2->B hit"]),          # B's state is the newer one
        ("submit r3 s2 @9", ["r3->A hit"]),
    ]),
    "a turn placed away from its live warm worker names it (its state can move)": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        ("worker A 1 @0", []), ("worker B 1 @0", []),
        ("submit r1 s1 @0", ["r1->A"]),
        ("finish r1 @1", []),
        ("submit r2 s2 @1", ["r2->B"]),
        ("finish r2 @1", []),
        ("submit r3 s2 @2", ["r3->B hit"]),          # B busy with s2
        ("submit r4 - @2", ["r4->A"]),               # A busy too
        ("submit r5 s1 @2", []),                     # waits for A
        ("finish r3 @3", []),
        ("tick @7", ["r5->B spill from A"]),
        ("finish r5 @8", []),
        ("submit r6 s1 @8", ["r6->B hit"]),          # its home is B now (A is still busy)
    ]),
    # Spill by cost. Speeds 100 prompt tokens/s, 20 answer tokens/s; an answer is taken to
    # be 128 tokens until answers are seen, a prompt 0.3 tokens per character.
    "a long history waits for its busy warm worker rather than be read again elsewhere": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        ("worker A 1", []), ("worker B 1", []), ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=6600 @0", ["r1->A"]),
        ("finish r1 @1 usage=2000+32", []),          # s1 holds 2,032 tokens on A
        ("submit r2 s2 chars=150 @1", ["r2->B"]),
        ("finish r2 @2 usage=50+32", []),
        ("submit r3 s3 chars=300 @2 >A", ["r3->A prefix"]),  # A busy for ~5.6 s
        ("submit r4 s1 chars=300 @2", []),           # B would read 2,032 tokens: ~20 s
        ("tick @6.9", []),
        ("tick @7", ["r4->B spill from A"]),         # --affinity-wait: the upper bound
    ]),
    "a short history goes to a free worker at once rather than wait": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        ("worker A 1", []), ("worker B 1", []), ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=660 @0", ["r1->A"]),
        ("finish r1 @1 usage=200+32", []),           # s1 holds 232 tokens on A
        ("submit r2 s2 chars=150 @1", ["r2->B"]),
        ("finish r2 @2 usage=50+32", []),
        ("submit r3 s3 chars=300 @2 >A", ["r3->A prefix"]),
        ("submit r4 s1 chars=800 @2", ["r4->B spill from A"]),  # ~2.3 s on B < ~5.6 s
    ]),
    "a state that moves fast spills at once even with a long history": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        *_long_history_on_busy_a("f"),
        ("submit r4 s1 chars=300 @2", ["r4->B spill from A"]),  # 203 MB at 50 MB/s: ~4.1 s
    ]),
    "with migration off the same state is read again, so it waits": (
        {"affinity_wait": 5, "worker_expiry": 100, "migration": False}, [
        *_long_history_on_busy_a("f"),
        ("submit r4 s1 chars=300 @2", []),
        ("finish r3 @4", ["r4->A hit"]),
    ]),
    "states of another format cannot move: read again, so it waits": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        *_long_history_on_busy_a("g"),
        ("submit r4 s1 chars=300 @2", []),
    ]),
    "a history of unknown size waits until the upper bound": (
        {"affinity_wait": 5, "worker_expiry": 100}, [
        ("worker A 1 m s1", []), ("worker B 1", []),
        ("submit r1 - chars=300 @0 >A", ["r1->A prefix"]),
        ("submit r2 s1 @0", []),                     # no text: nothing to weigh
        ("tick @5", ["r2->B spill from A"]),
    ]),
    # A and its sessions s1, s4, s5 (claimed at start: sizes estimated from their text).
    "alone, a mid-sized history waits for its warm worker": (
        {"affinity_wait": 60, "worker_expiry": 100}, [
        ("worker A 1 m s1,s4,s5", []), ("worker B 1", []),
        ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=300 @0", ["r1->A hit"]),  # ~6.4 s left
        ("submit r3 s5 chars=2700 @0", []),            # 810 tokens: ~8.1 s on B
    ]),
    "requests queued before it for the same worker lengthen its wait": (
        {"affinity_wait": 60, "worker_expiry": 100}, [
        ("worker A 1 m s1,s4,s5", []), ("worker B 1", []),
        ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=300 @0", ["r1->A hit"]),
        ("submit r2 s4 chars=10000 @0", []),           # 3,000 tokens: waits for A
        ("submit r3 s5 chars=2700 @0", ["r3->B spill from A"]),  # after r1 and r2: ~13 s
    ]),
    "an answer nearly written shortens the wait": (
        {"affinity_wait": 60, "worker_expiry": 100}, [
        ("worker A 1 m s1,s5", []), ("worker B 1", []),
        ("speed A 100 20", []), ("speed B 100 20", []),
        ("submit r1 s1 chars=300 @0", ["r1->A hit"]),
        ("chunk r1 tokens=120", []),                   # ~8 tokens left: ~0.4 s
        ("submit r3 s5 chars=2000 @0", []),            # 600 tokens: ~6 s on B
    ]),
    "a slow warm worker loses the request to a fast free one": (
        {"affinity_wait": 60, "worker_expiry": 100}, [
        ("worker A 1 m s1,s5", []), ("worker B 1", []),
        ("speed A 100 2", []), ("speed B 100 20", []),  # A writes 2 tokens/s
        ("submit r1 s1 chars=300 @0", ["r1->A hit"]),  # ~64 s left
        ("submit r3 s5 chars=20000 @0", ["r3->B spill from A"]),  # 6,000 tokens: 60 s
    ]),
    "round-robin ignores sessions and takes turns": ({"policy": "round-robin"}, [
        ("worker A 2", []), ("worker B 2", []),
        ("submit r1 s1 @0", ["r1->A"]),
        ("submit r2 s1 @0", ["r2->B"]),
        ("submit r3 s1 @0", ["r3->A"]),
        ("finish r1 @1", []),
        ("submit r4 s1 @1", ["r4->B"]),
        ("submit r5 s1 @1", ["r5->A"]),
        ("submit r6 s1 @1", []),
        ("finish r4 @2", ["r6->B"]),
    ]),
}


def _describe(action) -> str:
    match action:
        case Dispatch(job=j, worker=w, how=how, warm_on=warm):
            tag = {Placement.AFFINITY: " hit", Placement.LOAD: ""}.get(how, f" {how.value}")
            return f"{j}->{w.decode()}{tag}" + (f" from {warm.decode()}" if warm else "")
        case Fail(job=j, code=c):
            return f"fail {j} {c.value}"
        case CancelOnWorker(job=j, worker=w):
            return f"cancel {j}@{w.decode()}"
        case WorkerDead(worker=w):
            return f"dead {w.decode()}"
    raise AssertionError(action)


def _step(s: Scheduler, step: str) -> list[str]:
    opts = dict(w.split("=", 1) for w in step.split() if "=" in w)
    words = [w for w in step.split() if "=" not in w]
    owner = words.pop()[1:] if words[-1].startswith("%") else ""
    prefer = WorkerId(words.pop()[1:].encode()) if words[-1].startswith(">") else None
    at = float(words.pop()[1:]) if words[-1].startswith("@") else 0.0
    verb, *args = words
    W = lambda name: WorkerId(name.encode())  # noqa: E731
    match verb:
        case "worker":
            model = args[2] if len(args) > 2 else "m"
            sessions = tuple(args[3].split(",")) if len(args) > 3 else ()
            kv, _, fmt = opts.get("kv", "0:").partition(":")
            out = s.add_worker(W(args[0]), model, int(args[1]), at, sessions,
                               speed=Speed(kv_token_bytes=int(kv), state_format=fmt))
        case "speed":
            s.measured(W(args[0]), float(args[1]), float(args[2]))
            out = []
        case "submit":
            session = None if args[1] == "-" else SessionId(args[1])
            model = args[2] if len(args) > 2 else None
            out = s.submit(RequestId(args[0]), session, at, model=model, prefer=prefer,
                           owner=owner, prompt_chars=int(opts.get("chars", 0)))
        case "finish":
            usage = None
            if "usage" in opts:
                prompt, answer = map(int, opts["usage"].split("+"))
                usage = Usage(prompt_tokens=prompt, completion_tokens=answer)
            out = s.finished(RequestId(args[0]), at, usage)
        case "chunk":
            s.chunk_seen(RequestId(args[0]), resumable=args[1:] != ["plain"],
                         tokens=int(opts.get("tokens", 1)))
            out = []
        case "bounce":
            out = s.bounce(RequestId(args[0]), at)
        case "full":
            out = s.bounce(RequestId(args[0]), at, full=True)
        case "busy":
            out = s.occupied(W(args[0]), int(args[1]), at)
        case "drain":
            s.set_draining(W(args[0]))
            out = []
        case "cancel":
            out = s.cancel(RequestId(args[0]), at)
        case "beat":
            assert s.heard_from(W(args[0]), at)
            out = []
        case "evict":
            s.forget_sessions(W(args[0]), tuple(args[1:]))
            out = []
        case "tick":
            out = s.tick(at)
        case _:
            raise AssertionError(step)
    return [_describe(a) for a in out]


@pytest.mark.parametrize("name", CASES)
def test_policy(name):
    overrides, script = CASES[name]
    # The router's start-up grace only where a case is about it: else long since started.
    started = 0.0 if "startup_grace" in overrides else -1e9
    scheduler = Scheduler(SchedulerConfig(**overrides), started=started)
    for step, expected in script:
        assert _step(scheduler, step) == expected, f"{name}: step {step!r}"


def test_slot_accounting_never_goes_negative_or_over_capacity():
    s = Scheduler(SchedulerConfig())
    for step in ["worker A 2", "submit r1 - @0", "submit r2 - @0", "submit r3 - @0",
                 "cancel r1 @1", "finish r1 @1", "finish r1 @1", "finish r2 @2", "finish r3 @3"]:
        _step(s, step)
        view = s.workers[WorkerId(b"A")]
        assert 0 <= view.busy <= view.slots
    assert s.workers[WorkerId(b"A")].busy == 0
    assert not s.jobs and not s.queue


def test_next_wakeup_names_the_earliest_deadline():
    s = Scheduler(SchedulerConfig(affinity_wait=5, queue_timeout=60, worker_expiry=3))
    assert s.next_wakeup(0.0) is None
    for step in ["worker A 1 @0", "worker B 1 @0", "submit r1 s1 @0", "submit r3 s1 @1"]:
        _step(s, step)
    assert s.queue_depth == 1  # r3 waits for A
    assert s.next_wakeup(1.0) == 3.0  # the workers' heartbeat expiry
    s.heard_from(WorkerId(b"A"), 10.0)
    s.heard_from(WorkerId(b"B"), 10.0)
    assert s.next_wakeup(1.0) == 6.0  # r3's spill time (arrived at 1, waits 5)
    # Once past the spill time, it is not reported again (no busy loop).
    assert s.next_wakeup(6.5) == 13.0


def test_affinity_memory_is_bounded():
    s = Scheduler(SchedulerConfig(max_sessions=3))
    _step(s, "worker A 8")
    for i in range(6):
        _step(s, f"submit r{i} s{i} @0")
    assert list(s.affinity) == ["s3", "s4", "s5"]
    assert s.workers[WorkerId(b"A")].warm == 3


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown policy"):
        Scheduler(SchedulerConfig(policy="random"))  # type: ignore[arg-type]
