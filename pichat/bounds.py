"""Every bound on what one peer can make pichat spend, in one place, each with the test
that proves it (tests/test_bounds.py checks that each test exists and that the docs'
table lists each bound). The numbers themselves live where they are enforced; this is the
index, imported by nothing at run time.
"""

from __future__ import annotations

from dataclasses import dataclass

from pichat import protocol, schemas
from pichat.router.api.guard import UNTRUSTED_PER_ADDRESS
from pichat.router.daemon import joins, keyring, roster
from pichat.router.observe import floating
from pichat.worker.daemon import migration

__all__ = ["Bound", "BOUNDS"]


@dataclass(frozen=True, slots=True)
class Bound:
    what: str
    limit: str
    test: str
    """tests/FILE.py::TEST_NAME"""


BOUNDS: tuple[Bound, ...] = (
    # --- messages on the wire --------------------------------------------------------
    Bound("one frame", f"--max-message-bytes ({protocol.DEFAULT_MAX_MESSAGE_BYTES} bytes): "
          "libzmq drops the connection",
          "tests/test_router.py::test_oversized_message_drops_the_connection_not_the_router"),
    Bound("frames of one message", "more than three are dropped as they are read, unread",
          "tests/test_hostile.py::test_a_message_of_endless_frames_is_dropped_unread"),
    Bound("decoding a body", "each command's budget of objects, token ids, depth and string "
          "length (`protocol.LIMITS`), counted before anything is built",
          "tests/test_unpack.py::test_a_hostile_body_is_refused_before_it_costs_memory"),
    Bound("a REQUEST", f"{protocol.MAX_MESSAGES} messages, {protocol.REQUEST_OBJECTS} "
          "objects (derived from its fields' own bounds): what a router sends, a worker "
          "decodes",
          "tests/test_protocol.py::test_the_largest_request_a_worker_accepts_decodes_within_"
          "its_limits"),
    Bound("an undecodable request", "answered with an ERROR at once (its id read without "
          "decoding the rest): no slot is held",
          "tests/test_hostile.py::test_a_request_only_a_router_could_read_never_holds_a_worker_"
          "slot"),
    Bound("a request a worker would refuse", "refused by the router first, a 400 naming the "
          "limit", "tests/test_admission.py::test_a_request_a_worker_would_refuse_to_decode_is_"
          "refused_naming_the_limit"),
    Bound("a stored conversation", "sent as its newest whole turns that fit a request "
          "(messages, characters, bytes)",
          "tests/test_conversations.py::test_a_stored_conversation_of_more_messages_than_a_"
          "request_carries_goes_on"),
    # --- grammars ----------------------------------------------------------------------
    Bound("a schema's counts and quantifiers", f"{schemas.MAX_REPEAT}; the grammar it makes "
          f"{schemas.MAX_GRAMMAR_CHARS} characters, estimated before any expansion",
          "tests/test_schemas.py::test_a_grammar_bomb_is_refused_before_any_expansion_by_"
          "router_and_worker"),
    Bound("a schema's shape", f"depth {schemas.MAX_DEPTH}, {schemas.MAX_NODES} sub-schemas, "
          f"{schemas.MAX_PROPERTIES} properties, {schemas.MAX_ENUM} enum values",
          "tests/test_schemas.py::test_check_schema_names_every_bound_it_enforces"),
    Bound("a pattern's ambiguity", f"{schemas.MAX_READINGS} readings and {schemas.MAX_LIVE} "
          "places alive at once; no unbounded repetition of an ambiguous item",
          "tests/test_schemas.py::test_a_grammar_bomb_is_refused_before_any_expansion_by_"
          "router_and_worker"),
    # --- KV states ---------------------------------------------------------------------
    Bound("a migrated KV state", "charged at what it holds; refused if its declared size or "
          "its bytes do not add up for its tokens",
          "tests/test_state_mover.py::test_the_target_refuses_what_does_not_check_out"),
    Bound("transfers", f"{migration.MAX_INCOMING} received and {migration.MAX_OUTGOING} sent "
          f"at once, {migration.WINDOW} pieces in flight, given up after "
          f"{migration.STALL_S:.0f} s of silence",
          "tests/test_state_mover.py::test_a_receiver_takes_at_most_two_transfers_at_once_and_"
          "expires_stalled_ones"),
    # --- connections, the loop, logs ---------------------------------------------------
    Bound("the event loop", "a reader handles at most 256 messages or 20 ms, then yields; the "
          "workers' socket is read before a worker is judged silent",
          "tests/test_hostile.py::test_decoding_bombs_are_refused_before_they_cost_and_no_"
          "worker_is_lost"),
    Bound("queues per connection", "1,000 messages each way for a client, 10,000 for a worker",
          "tests/test_hostile.py::test_a_status_flood_that_is_never_read_costs_little"),
    Bound("STATUS", "one shared snapshot, --status-per-s per connection; a client that never "
          "reads is cut off", "tests/test_hostile.py::test_a_status_flood_that_is_never_read_"
          "costs_little"),
    Bound("log lines", "the first of a kind at once, repeats summed once per "
          "--log-repeat-window; network values escaped",
          "tests/test_hostile.py::test_repeated_refusals_are_logged_once_and_summed_up"),
    Bound("forged log lines", "newlines, separators and bidi overrides escaped in every value",
          "tests/test_logs.py::test_a_value_from_the_network_cannot_write_a_line_of_its_own"),
    Bound("HTTP connections", "--http-max-connections, a quarter per address, "
          f"{UNTRUSTED_PER_ADDRESS} untrusted per address (the oldest closed for a newer "
          "one), --http-idle-timeout",
          "tests/test_http.py::test_a_flood_of_silent_connections_never_locks_an_"
          "authenticated_client_out"),
    Bound("HTTP bodies", "413 over --max-message-bytes, 408 past --http-body-timeout, a 400 "
          "naming the field for malformed input",
          "tests/test_malformed.py::test_every_field_replaced_by_garbage_is_a_400_naming_it_never_a_500"),
    Bound("joins", f"{joins.MAX_PER_MINUTE} attempts a minute; a refused join uses nothing",
          "tests/test_invites.py::test_a_right_token_with_a_name_or_key_that_cannot_be_"
          "admitted_uses_nothing"),
    Bound("keys shared through etcd",
          "only admitted keys', tombstones' and invitations' file names (nothing outside the "
          f"keys directory, no key pair, no API key); {keyring.MAX_BYTES // 1024} KiB a file, "
          f"text only, {keyring.MAX_FILES:,} files; skipped ones logged once; a file here "
          "that cannot be read is never shared as removed (etcd is as trusted as the keys "
          "directory: let only the router Pis reach it)",
          "tests/test_keyring.py::test_what_etcd_holds_is_checked_as_a_peer_s_message"),
    Bound("routers named to a joiner (etcd)",
          f"{roster.MAX_ROUTERS} at most, freshest first; a record of "
          f"{roster.MAX_RECORD_BYTES} bytes at most, one plain tcp://HOST:PORT each, "
          "refreshed within a week; the joiner checks each endpoint again",
          "tests/test_ha.py::test_the_other_routers_a_join_names_are_read_as_a_peer_s_message"),
    Bound("the floating address's record (etcd)",
          f"{floating.RECORD_MAX_BYTES} bytes, a JSON object, a name of 256 characters, a "
          "finite time; anything else is no failover",
          "tests/test_ha.py::test_the_router_taking_the_address_reads_whom_it_came_from_and_"
          "when"),
    Bound("slots between routers", "a worker never runs more than its slots; a slot "
          "freed is kept a heartbeat for the router refused longest, so a busy router "
          "cannot starve another; a request placed again by a router cut off and back "
          "never takes a stream from the router its client moved to",
          "tests/test_worker.py::test_routers_refused_for_want_of_a_slot_take_turns_with_"
          "the_busy_one"),
    Bound("the queue", "--queue-limit, shared fairly between owners",
          "tests/test_hostile.py::test_a_client_that_fills_every_slot_and_the_queue_delays_"
          "another_by_one_answer"),
    Bound("sessions, leases, prefixes", "--max-sessions; the least recently used dropped",
          "tests/test_scheduler.py::test_affinity_memory_is_bounded"),
    Bound("warm claims", f"a READY {protocol.MAX_LISTED_SESSIONS}, a HEARTBEAT "
          f"{protocol.MAX_WARMED}; each counts only with this router's lease for that worker "
          "(refusals counted, logged once)",
          "tests/test_router.py::test_a_turn_begun_through_another_router_brings_the_session_"
          "to_its_worker"),
    Bound("stored conversations", "messages, bytes per conversation and per owner; the least "
          "recently used dropped past the store's bound",
          "tests/test_memory_store.py::test_limits_refuse_with_a_clear_error_and_store_nothing"),
)
