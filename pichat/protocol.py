"""The pichat wire protocol, version 1: every byte that crosses a socket is defined here.

A message is a ZeroMQ multipart message of three frames. (A ROUTER socket puts the
sender's routing id in front when it receives and takes it off when it sends; that frame
belongs to ZeroMQ, not to this protocol.)

    frame 0   protocol tag   b"PICHAT1"; the trailing digit is the protocol version
    frame 1   command        one byte, a `Command`
    frame 2   body           a msgpack map; its fields per command are below

    command     direction               body fields (? = optional)
    ---------   ---------------------   -----------------------------------------------
    READY       worker -> router        worker, model, backend, slots, ctx, version,
                                        warm? (session -> lease: the warm sessions, as the
                                        router leased them, re-announced on reconnect)
    HEARTBEAT   worker <-> router,      worker -> router: busy, warm, evicted, warmed?
                                        (session -> lease, begun through another router),
                                        answered? (session -> state hash), tps, draining;
                router -> client        otherwise empty
    REQUEST     client -> router        id, session?, messages | prompt, sampling, timeout?,
                router -> worker        model?, continuation?  (prompt: plain text, no chat
                                        template; continuation: token ids already answered,
                                        which the answer goes on from); router -> worker
                                        also: owner? (whose request: KV reuse across owners
                                        stops at message boundaries), isolate? (no reuse
                                        across owners), lease? (the router's proof that it
                                        placed the session on this worker); truncate?
                                        (false: a conversation too long for the context
                                        fails instead of dropping its oldest turns);
                                        memory?, remembered? (a note standing for the
                                        first `remembered` messages after the system ones)
    CHUNK       worker -> router        id, seq (0, 1, 2...), text, tokens (their ids)
                -> client
    DONE        worker -> router        id, worker, finish ("stop" | "length" |
                -> client               "cancelled"), usage (dropped_tokens: what slid
                                        out of the context), failovers?, conversation?;
                                        worker -> router: memory?, remembered? (a note
                                        of the turns that slid out, written now)
    ERROR       any direction           id ("" when no request is concerned), code, message
    CANCEL      client -> router        id
                router -> worker
    DISCONNECT  router <-> worker       reason (router: "I do not know you, send READY";
                                        worker: "I am leaving"), sessions? (its warm ones)
    STATUS      client -> router        empty; the reply (router -> client) is a snapshot
                router -> client        of the cluster (see `Status`)
    CONVERSATIONS client -> router      op ("list"|"get"|"create"|"rename"|"delete"), ref?,
                router -> client        id?, title?, offset?, limit?; the reply: the same
                                        op and ref, and result (see `Conversations`); an
                                        ERROR's id is the ref

A REQUEST may name a stored `conversation` (its id, or a title: the owner's conversation
of that title, made if there is none): its messages are then only the new ones, the
router adds the history and keeps the turn, and the DONE names the `conversation` id.

Decoding validates every field it reads and raises `ProtocolError` for anything
malformed; fields it does not know are ignored, so a newer peer may add fields without a
version bump. Changing the meaning or type of a field needs a new version tag.

What a body may cost to decode is bounded per command before it is decoded
(pichat/unpack.py, `LIMITS` below): objects, integers in token lists, nesting and string
length. A message with more frames than the protocol has never reaches `decode` (the
transport drops it frame by frame). Error texts quote what a peer sent only clipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import IntEnum
from typing import Any, ClassVar, Literal, NewType, TypeAlias

import msgpack

from pichat.errors import ErrorCode, ProtocolError
from pichat.logs import clip
from pichat.unpack import DecodeError, Limits, unpack

__all__ = [
    "VERSION",
    "TAG",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Command",
    "RequestId",
    "SessionId",
    "ChatMessage",
    "Sampling",
    "Usage",
    "Ready",
    "Heartbeat",
    "Request",
    "Chunk",
    "Done",
    "Error",
    "Cancel",
    "Disconnect",
    "Status",
    "Migrate",
    "State",
    "StateAck",
    "Conversations",
    "Join",
    "MAX_STATE_PIECE",
    "Message",
    "LIMITS",
    "REQUEST_OBJECTS",
    "check",
    "encode",
    "decode",
]

VERSION = 1
TAG = b"PICHAT%d" % VERSION
_TAG_FAMILY = b"PICHAT"

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Every pichat socket refuses bigger messages (ZMQ_MAXMSGSIZE drops the connection)."""

RequestId = NewType("RequestId", str)
SessionId = NewType("SessionId", str)

Role: TypeAlias = Literal["system", "user", "assistant", "tool"]
Finish: TypeAlias = Literal["stop", "length", "cancelled"]

ROLES: frozenset[str] = frozenset(("system", "user", "assistant", "tool"))
FINISH_REASONS: frozenset[str] = frozenset(("stop", "length", "cancelled"))

MAX_ID_CHARS = 64
MAX_SESSION_CHARS = 192
"""A client's session id (128) with the router's owner prefix."""
MAX_NAME_CHARS = 256
MAX_TITLE_CHARS = 200
MAX_EMBED_INPUTS = 128
MAX_EMBED_CHARS = 32 * 1024
MAX_EMBED_BYTES = 64 * 1024
"""One embedding vector at most (16,384 float32s)."""
MAX_TOOLS_CHARS = 64 * 1024
MAX_TOOLS = 128
"""Functions one request may offer the model."""
MAX_TOOL_NAME_CHARS = 64
"""Tool definitions, a message's tool calls, a response format's schema: JSON as text."""
MAX_MEMORY_CHARS = 4000
"""A conversation's note of its turns that slid out of the context
(pichat/worker/engine/summary.py)."""
"""A stored conversation's title (or id)."""
MAX_MESSAGES = 4096
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 256
MAX_TOKENS_LIMIT = 1 << 20
MAX_TOKEN_LIST = 1 << 17
"""Token ids in one continuation or chunk (a context of 128k tokens)."""
MAX_LISTED_SESSIONS = 1 << 16
"""Sessions named in one READY, HEARTBEAT or DISCONNECT."""
MAX_WARMED = 256
"""Sessions a HEARTBEAT names as begun for other routers (each with its lease)."""
MAX_TIMEOUT_S = 7 * 24 * 3600.0
MAX_ATTEMPTS = 1000
MAX_ENDPOINTS_CHARS = 2048
"""A list of router endpoints (a JOIN reply's: up to 8 routers)."""
MAX_SMALL_TEXT = 64 * 1024
"""Longest string in a message that carries no prompt or answer text (an error's)."""


class Command(IntEnum):
    """Frame 1 of every message."""

    READY = 1
    """A worker announces itself and its capacity."""
    HEARTBEAT = 2
    """I am alive. Workers add their load so `status` stays current."""
    REQUEST = 3
    """Generate a chat answer."""
    CHUNK = 4
    """The next piece of an answer's text."""
    DONE = 5
    """The answer is complete; carries usage."""
    ERROR = 6
    """A request (or a message) failed; carries an `ErrorCode`."""
    CANCEL = 7
    """Stop generating this request."""
    DISCONNECT = 8
    """End of a worker's registration."""
    STATUS = 9
    """Ask for, or answer with, a snapshot of the cluster."""
    MIGRATE = 10
    """Router to a worker: send this session's KV state (to another worker, through me)."""
    STATE = 11
    """A piece of a KV state on its way from one worker to another (through the router)."""
    STATE_ACK = 12
    """The receiving worker has these pieces (a credit for more), or is done, or refuses."""
    CONVERSATIONS = 13
    """A client's stored conversations: list, read, rename, delete (and the answer)."""
    JOIN = 14
    """A new Pi redeems a join token (pichat/invites.py), on the router's join endpoint."""


class _Fields:
    """Typed reads from a decoded body, raising `ProtocolError` with the field's name."""

    def __init__(self, command: Command, data: Mapping[str, Any]) -> None:
        self.command = command
        self.data = data

    def _fail(self, key: str, expected: str) -> ProtocolError:
        got = type(self.data.get(key)).__name__
        return ProtocolError(f"{self.command.name}: field {key!r} must be {expected} (got {got})")

    def _get(self, key: str, default: Any, required: bool) -> Any:
        if key in self.data and self.data[key] is not None:
            return self.data[key]
        if required:
            raise ProtocolError(f"{self.command.name}: field {key!r} is missing")
        return default

    def str(self, key: str, *, max_chars: int = MAX_NAME_CHARS, min_chars: int = 0,
            required: bool = True, default: str | None = "") -> Any:
        value = self._get(key, default, required)
        if value is None:
            return None
        if not isinstance(value, str) or not min_chars <= len(value) <= max_chars:
            raise self._fail(key, f"a string of {min_chars} to {max_chars} characters")
        return value

    def int(self, key: str, *, lo: int = 0, hi: int = 1 << 62, required: bool = True,
            default: int | None = 0) -> Any:
        value = self._get(key, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._fail(key, f"an integer from {lo} to {hi}")
        return value

    def float(self, key: str, *, lo: float = 0.0, hi: float = math.inf,
              required: bool = True, default: float | None = 0.0) -> Any:
        value = self._get(key, default, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"a number from {lo} to {hi}")
        value = float(value)
        if not (lo <= value <= hi):  # also rejects NaN
            raise self._fail(key, f"a number from {lo} to {hi}")
        return value

    def str_list(self, key: str, *, max_items: int, max_chars: int = MAX_NAME_CHARS,
                 min_chars: int = 0, required: bool = False) -> tuple[str, ...]:
        value = self._get(key, [], required)
        if not isinstance(value, (list, tuple)) or len(value) > max_items or not all(
            isinstance(v, str) and min_chars <= len(v) <= max_chars for v in value
        ):
            raise self._fail(key, f"a list of at most {max_items} strings")
        return tuple(value)

    def bytes_list(self, key: str, *, max_items: int, max_bytes: int) -> tuple[bytes, ...]:
        value = self._get(key, [], False)
        if not isinstance(value, (list, tuple)) or len(value) > max_items or not all(
            isinstance(v, bytes) and len(v) <= max_bytes for v in value
        ):
            raise self._fail(key, f"a list of at most {max_items} binaries")
        return tuple(value)

    def int_list(self, key: str, *, max_items: int, hi: int = (1 << 31) - 1) -> tuple[int, ...]:
        value = self._get(key, [], False)
        if not isinstance(value, (list, tuple)) or len(value) > max_items or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= hi for v in value
        ):
            raise self._fail(key, f"a list of at most {max_items} token ids")
        return tuple(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self._get(key, default, False)
        if not isinstance(value, bool):
            raise self._fail(key, "a boolean")
        return value

    def bytes(self, key: str, *, max_bytes: int) -> bytes:
        value = self._get(key, b"", False)
        if not isinstance(value, (bytes, bytearray)) or len(value) > max_bytes:
            raise self._fail(key, f"binary of at most {max_bytes} bytes")
        return bytes(value)

    def map(self, key: str, *, required: bool = True) -> Mapping[str, Any]:
        value = self._get(key, {}, required)
        if not isinstance(value, Mapping):
            raise self._fail(key, "a map")
        return value


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: str = ""
    """An assistant message's tool calls: a JSON array of {"id", "name", "arguments"}
    (arguments: the call's JSON object as text)."""
    tool_call_id: str = ""
    """A tool message: the call it answers."""

    @classmethod
    def parse(cls, value: Any, index: int) -> ChatMessage:
        if not isinstance(value, Mapping):
            raise ProtocolError(f"REQUEST: messages[{index}] must be a map with role and content")
        role, content = value.get("role"), value.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise ProtocolError(
                f"REQUEST: messages[{index}].role must be one of {sorted(ROLES)} "
                f"(got {clip(role, 40)})")
        if not isinstance(content, str):
            raise ProtocolError(f"REQUEST: messages[{index}].content must be a string")
        calls, answers = value.get("tool_calls", ""), value.get("tool_call_id", "")
        if not isinstance(calls, str) or len(calls) > MAX_TOOLS_CHARS:
            raise ProtocolError(f"REQUEST: messages[{index}].tool_calls must be a string of "
                                f"at most {MAX_TOOLS_CHARS} characters")
        if not isinstance(answers, str) or len(answers) > MAX_ID_CHARS:
            raise ProtocolError(f"REQUEST: messages[{index}].tool_call_id must be a string")
        return cls(role, content, calls, answers)

    def to_body(self) -> dict[str, Any]:
        body = {"role": self.role, "content": self.content}
        if self.tool_calls:
            body["tool_calls"] = self.tool_calls
        if self.tool_call_id:
            body["tool_call_id"] = self.tool_call_id
        return body


@dataclass(frozen=True, slots=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy (deterministic)."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    grammar: str = ""
    """A GBNF grammar the answer must follow: set by the worker from the request's
    `format` or `tool_choice` (pichat/worker/engine/tools.py), never sent on the wire."""
    grammar_trigger: str = ""
    """If set, the grammar applies only from where one of these Python regexes (one per
    line), searched in the answer so far, matches (a tool call's start; before it, free
    text)."""

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Sampling:
        f = _Fields(Command.REQUEST, data)
        d = cls()
        return cls(
            temperature=f.float("temperature", hi=5.0, required=False, default=d.temperature),
            top_p=f.float("top_p", hi=1.0, required=False, default=d.top_p),
            top_k=f.int("top_k", hi=100_000, required=False, default=d.top_k),
            min_p=f.float("min_p", hi=1.0, required=False, default=d.min_p),
            repeat_penalty=f.float("repeat_penalty", lo=0.1, hi=10.0, required=False,
                                   default=d.repeat_penalty),
            seed=f.int("seed", lo=0, hi=(1 << 32) - 1, required=False, default=None),
            max_tokens=f.int("max_tokens", lo=1, hi=MAX_TOKENS_LIMIT, required=False,
                             default=d.max_tokens),
            stop=f.str_list("stop", max_items=MAX_STOP_STRINGS, min_chars=1,
                            max_chars=MAX_STOP_CHARS),
        )

    def to_body(self) -> dict[str, Any]:
        body = asdict(self)
        body["stop"] = list(self.stop)
        del body["grammar"], body["grammar_trigger"]
        return body


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer cost. `cached_tokens` of the prompt were not evaluated again."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    """Restoring the session's KV state and evaluating the uncached prompt tokens."""
    generate_ms: float = 0.0
    """From the first generated token to the last."""
    dropped_tokens: int = 0
    """Tokens of the oldest turns left out so that the conversation fits the context."""

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> Usage:
        f = _Fields(Command.DONE, data)
        usage = cls(
            prompt_tokens=f.int("prompt_tokens"),
            cached_tokens=f.int("cached_tokens"),
            completion_tokens=f.int("completion_tokens"),
            prompt_ms=f.float("prompt_ms"),
            generate_ms=f.float("generate_ms"),
            dropped_tokens=f.int("dropped_tokens", required=False),
        )
        if usage.cached_tokens > usage.prompt_tokens:
            raise ProtocolError("DONE: usage.cached_tokens exceeds usage.prompt_tokens")
        return usage

    @property
    def tokens_per_s(self) -> float:
        if self.completion_tokens < 2 or self.generate_ms <= 0:
            return 0.0
        return (self.completion_tokens - 1) / (self.generate_ms / 1000.0)


@dataclass(frozen=True, slots=True)
class Ready:
    COMMAND: ClassVar[Command] = Command.READY
    worker: str
    model: str
    backend: str
    slots: int
    ctx: int
    version: str
    warm: tuple[tuple[str, str], ...] = ()
    """(session, lease) of each session warm here: the router trusts only its own leases."""
    engine: str = ""
    """How the worker decodes its slots (`batched`, `contexts`, `sim`)."""
    kv_type: str = ""
    kv_cells: int = 0
    """Tokens of KV cache the worker's context(s) hold room for, all slots together."""
    kv_token_bytes: int = 0
    """RAM one token takes in the KV cache."""
    cache_bytes: int = 0
    """The budget of the session store (KV states parked outside the slots)."""
    state_format: str = ""
    """What the worker's KV states are valid for (model file, KV type): states move only
    between workers of one format."""
    embedding_only: bool = False
    """The worker serves an embedding model: embeddings requests only, no chat."""
    weights_bytes: int = 0
    """The model file's size."""
    family: str = ""
    """The model's architecture (qwen2, llama, gemma3...), from its GGUF."""
    parameter_size: str = ""
    """Its parameter count ("494.03M")."""
    quantization: str = ""
    """How its weights are stored ("Q4_K_M")."""

    @classmethod
    def from_body(cls, f: _Fields) -> Ready:
        warm = _leased(f, "READY", "warm", MAX_LISTED_SESSIONS)
        return cls(
            worker=f.str("worker", min_chars=1, max_chars=MAX_NAME_CHARS),
            model=f.str("model", min_chars=1),
            backend=f.str("backend", min_chars=1, max_chars=32),
            slots=f.int("slots", lo=1, hi=1024),
            ctx=f.int("ctx", lo=1, hi=1 << 24),
            version=f.str("version", max_chars=64),
            warm=warm,
            engine=f.str("engine", max_chars=32, required=False),
            kv_type=f.str("kv_type", max_chars=32, required=False),
            kv_cells=f.int("kv_cells", hi=1 << 40, required=False),
            kv_token_bytes=f.int("kv_token_bytes", hi=1 << 30, required=False),
            cache_bytes=f.int("cache_bytes", hi=1 << 50, required=False),
            state_format=f.str("state_format", max_chars=MAX_FORMAT_CHARS, required=False),
            embedding_only=f.bool("embedding_only"),
            weights_bytes=f.int("weights_bytes", hi=1 << 50, required=False),
            family=f.str("family", max_chars=32, required=False),
            parameter_size=f.str("parameter_size", max_chars=32, required=False),
            quantization=f.str("quantization", max_chars=32, required=False),
        )

    def to_body(self) -> dict[str, Any]:
        body = {**asdict(self), "warm": dict(self.warm)}
        if not self.warm:
            del body["warm"]
        return body


def _leased(f: _Fields, command: str, name: str, most: int) -> tuple[tuple[str, str], ...]:
    """A map of session ids to leases: (session, lease) pairs."""
    found = f.map(name, required=False)
    if len(found) > most or not all(
        isinstance(v, str) and 0 < len(k) <= MAX_SESSION_CHARS and len(v) <= MAX_ID_CHARS
        for k, v in found.items()
    ):
        raise ProtocolError(f"{command}: field {name!r} must map at most {most} session ids "
                            "to leases (strings)")
    return tuple(found.items())


@dataclass(frozen=True, slots=True)
class Heartbeat:
    COMMAND: ClassVar[Command] = Command.HEARTBEAT
    busy: int = 0
    warm: int = 0
    evicted: tuple[str, ...] = ()
    """Sessions the worker dropped from its KV cache since its last heartbeat."""
    warmed: tuple[tuple[str, str], ...] = ()
    """(session, lease) of each session a turn began for since the last heartbeat, through
    another router (a worker serving several): its newest state is here now."""
    answered: tuple[tuple[str, str], ...] = ()
    """(session, state) of each such turn that ended: `state` is the hex hash of the
    conversation with its answer (pichat/router/policy/prefix.py), so that this router
    knows the next turn of a client that keeps no session id."""
    tps: float = 0.0
    """Recent generation speed, tokens per second."""
    prompt_tps: float = 0.0
    """Recent prompt reading speed, tokens per second."""
    draining: bool = False
    """The worker is stopping: it finishes what it has and takes nothing new."""
    kv_used: int = 0
    """Tokens of KV the slots hold."""
    store_bytes: int = 0
    """RAM the session store takes."""
    disk_states: int = 0
    """Conversations whose state is written on disk (`--state-dir`)."""
    disk_bytes: int = 0
    disk_restored: int = 0
    """States read back from disk since the worker started."""
    disk_refused: int = 0
    """State files found damaged or made for another model, and deleted."""
    disk_refused_format: int = 0
    """Of those, the ones made for another model or KV type."""

    @classmethod
    def from_body(cls, f: _Fields) -> Heartbeat:
        return cls(
            busy=f.int("busy", hi=1024, required=False),
            warm=f.int("warm", required=False),
            evicted=f.str_list("evicted", max_items=MAX_LISTED_SESSIONS,
                               max_chars=MAX_SESSION_CHARS),
            warmed=_leased(f, "HEARTBEAT", "warmed", MAX_WARMED),
            answered=_leased(f, "HEARTBEAT", "answered", MAX_WARMED),
            tps=f.float("tps", hi=1e9, required=False),
            prompt_tps=f.float("prompt_tps", hi=1e9, required=False),
            draining=f.bool("draining"),
            kv_used=f.int("kv_used", hi=1 << 40, required=False),
            store_bytes=f.int("store_bytes", hi=1 << 50, required=False),
            disk_states=f.int("disk_states", hi=1 << 40, required=False),
            disk_bytes=f.int("disk_bytes", hi=1 << 60, required=False),
            disk_restored=f.int("disk_restored", hi=1 << 60, required=False),
            disk_refused=f.int("disk_refused", hi=1 << 60, required=False),
            disk_refused_format=f.int("disk_refused_format", hi=1 << 60, required=False),
        )

    def to_body(self) -> dict[str, Any]:
        if self == _EMPTY_HEARTBEAT:
            return {}
        body = {**asdict(self), "evicted": list(self.evicted), "warmed": dict(self.warmed),
                "answered": dict(self.answered)}
        for name in ("warmed", "answered"):
            if not body[name]:
                del body[name]
        return body


_EMPTY_HEARTBEAT = Heartbeat()


@dataclass(frozen=True, slots=True)
class Request:
    COMMAND: ClassVar[Command] = Command.REQUEST
    id: RequestId
    messages: tuple[ChatMessage, ...]
    sampling: Sampling = field(default_factory=Sampling)
    session: SessionId | None = None
    """Requests of one session go to the worker that holds its KV cache."""
    timeout: float | None = None
    """Seconds the client is willing to wait in all; the router may cap it."""
    model: str | None = None
    """Only workers serving this model may take the request; None: any."""
    prompt: str | None = None
    """Plain text to continue, without the chat template (instead of `messages`)."""
    continuation: tuple[int, ...] = ()
    """Token ids of an answer already begun elsewhere (failover): continue after them."""
    owner: str | None = None
    """Whose request (set by the router; a tag, not a name): KV state left by one owner is
    reused for another only up to a whole-message boundary."""
    isolate: bool = False
    """No KV reuse across owners at all (the router's --isolate-cache)."""
    lease: str | None = None
    """The router's signature of (this worker, session): announced back in READY."""
    conversation: str | None = None
    """A stored conversation this request continues (client -> router): `messages` are
    only the new ones (pichat/memory)."""
    truncate: bool = True
    """A conversation too long for the context drops its oldest turns (False: the request
    fails with `context_length` instead)."""
    memory: str | None = None
    """A note of the conversation's start (router -> worker, a stored conversation's):
    it stands for the first `remembered` messages after the system messages."""
    remembered: int = 0
    tools: str = ""
    """Functions the model may call: a JSON array of {"name", "description",
    "parameters"} (the chat template shows them to the model)."""
    tool_choice: str = ""
    """"" or "auto": the model decides; "none"; "required": a call, always; "function:NAME":
    a call of that one (the last two are enforced by a grammar)."""
    format: str = ""
    """"json": the answer is a JSON object; else a JSON schema (as text) it matches; ""
    free text. Enforced by a grammar."""
    embed: tuple[str, ...] = ()
    """Texts to embed (instead of `messages`): the DONE carries their vectors."""
    attempt: int = 0
    """How many times the client has sent this request again (to another router, after
    the first fell silent). A worker running it for one router hands it to another only
    for a later attempt: a router cut off and back re-placing what it held is not the
    client moving."""

    @classmethod
    def from_body(cls, f: _Fields) -> Request:
        raw = f.data.get("messages")
        prompt = f.str("prompt", max_chars=DEFAULT_MAX_MESSAGE_BYTES, required=False,
                       default=None)
        embed = f.str_list("embed", max_items=MAX_EMBED_INPUTS, max_chars=MAX_EMBED_CHARS)
        if prompt is None and not embed and (
            not isinstance(raw, (list, tuple)) or not 1 <= len(raw) <= MAX_MESSAGES
        ):
            raise ProtocolError(f"REQUEST: messages must be a list of 1 to {MAX_MESSAGES} maps")
        if embed and (raw or prompt is not None):
            raise ProtocolError("REQUEST: give embed, or messages or prompt, not both")
        if prompt is not None and raw:
            raise ProtocolError("REQUEST: give messages or prompt, not both")
        return cls(
            id=RequestId(f.str("id", min_chars=1, max_chars=MAX_ID_CHARS)),
            messages=tuple(ChatMessage.parse(m, i) for i, m in enumerate(raw or ())),
            prompt=prompt,
            continuation=f.int_list("continuation", max_items=MAX_TOKEN_LIST),
            sampling=Sampling.parse(f.map("sampling", required=False)),
            session=f.str("session", min_chars=1, max_chars=MAX_SESSION_CHARS,
                          required=False, default=None),
            timeout=f.float("timeout", lo=0.001, hi=MAX_TIMEOUT_S, required=False,
                            default=None),
            model=f.str("model", min_chars=1, required=False, default=None),
            owner=f.str("owner", min_chars=1, max_chars=MAX_ID_CHARS, required=False,
                        default=None),
            isolate=f.bool("isolate"),
            lease=f.str("lease", min_chars=1, max_chars=MAX_ID_CHARS, required=False,
                        default=None),
            conversation=f.str("conversation", min_chars=1, max_chars=MAX_TITLE_CHARS,
                               required=False, default=None),
            truncate=f.bool("truncate", default=True),
            memory=f.str("memory", min_chars=1, max_chars=MAX_MEMORY_CHARS, required=False,
                         default=None),
            remembered=f.int("remembered", hi=MAX_MESSAGES, required=False),
            tools=f.str("tools", max_chars=MAX_TOOLS_CHARS, required=False, default=""),
            tool_choice=f.str("tool_choice", max_chars=MAX_NAME_CHARS + 16, required=False,
                              default=""),
            format=f.str("format", max_chars=MAX_TOOLS_CHARS, required=False, default=""),
            embed=tuple(embed),
            attempt=f.int("attempt", hi=MAX_ATTEMPTS, required=False),
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "messages": [m.to_body() for m in self.messages],
            "sampling": self.sampling.to_body(),
        }
        for key in ("session", "timeout", "model", "prompt", "owner", "lease", "conversation"):
            value = getattr(self, key)
            if value is not None:
                body[key] = value
        if self.continuation:
            body["continuation"] = list(self.continuation)
        if self.isolate:
            body["isolate"] = True
        if not self.truncate:
            body["truncate"] = False
        if self.memory:
            body["memory"] = self.memory
            body["remembered"] = self.remembered
        for key in ("tools", "tool_choice", "format", "attempt"):
            if getattr(self, key):
                body[key] = getattr(self, key)
        if self.embed:
            body["embed"] = list(self.embed)
        return body


@dataclass(frozen=True, slots=True)
class Chunk:
    COMMAND: ClassVar[Command] = Command.CHUNK
    id: RequestId
    seq: int
    text: str
    tokens: tuple[int, ...] = ()
    """The ids of the tokens this text is made of (exactly: a chunk ends on a token
    boundary), so that another worker can continue the answer token for token."""

    @classmethod
    def from_body(cls, f: _Fields) -> Chunk:
        return cls(
            id=RequestId(f.str("id", min_chars=1, max_chars=MAX_ID_CHARS)),
            seq=f.int("seq"),
            text=f.str("text", max_chars=DEFAULT_MAX_MESSAGE_BYTES),
            tokens=f.int_list("tokens", max_items=MAX_TOKEN_LIST),
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "seq": self.seq, "text": self.text}
        if self.tokens:
            body["tokens"] = list(self.tokens)
        return body


@dataclass(frozen=True, slots=True)
class Done:
    COMMAND: ClassVar[Command] = Command.DONE
    id: RequestId
    worker: str
    finish: Finish
    usage: Usage
    failovers: int = 0
    """Times the router moved this answer to another worker mid-stream."""
    conversation: str | None = None
    """The stored conversation the turn was kept in (router -> client)."""
    memory: str | None = None
    """A note the worker wrote of the turns that slid out (worker -> router), standing for
    the request's first `remembered` messages after its system messages."""
    remembered: int = 0
    embeddings: tuple[bytes, ...] = ()
    """An embed request's vectors, one per input, each little-endian float32s."""
    tools_left_out: tuple[str, ...] = ()
    """The request's tools that did not fit the context beside the conversation (the
    least relevant to it): the model was not shown them."""

    @classmethod
    def from_body(cls, f: _Fields) -> Done:
        finish = f.str("finish", max_chars=16)
        if finish not in FINISH_REASONS:
            raise ProtocolError(f"DONE: finish must be one of {sorted(FINISH_REASONS)}")
        return cls(
            id=RequestId(f.str("id", min_chars=1, max_chars=MAX_ID_CHARS)),
            worker=f.str("worker"),
            finish=finish,
            usage=Usage.parse(f.map("usage")),
            failovers=f.int("failovers", hi=1000, required=False),
            conversation=f.str("conversation", min_chars=1, max_chars=MAX_TITLE_CHARS,
                               required=False, default=None),
            memory=f.str("memory", min_chars=1, max_chars=MAX_MEMORY_CHARS, required=False,
                         default=None),
            remembered=f.int("remembered", hi=MAX_MESSAGES, required=False),
            embeddings=f.bytes_list("embeddings", max_items=MAX_EMBED_INPUTS,
                                    max_bytes=MAX_EMBED_BYTES),
            tools_left_out=f.str_list("tools_left_out", max_items=MAX_TOOLS, min_chars=1,
                                      max_chars=MAX_TOOL_NAME_CHARS),
        )

    def to_body(self) -> dict[str, Any]:
        body = {"id": self.id, "worker": self.worker, "finish": self.finish,
                "usage": asdict(self.usage)}
        if self.failovers:
            body["failovers"] = self.failovers
        if self.conversation:
            body["conversation"] = self.conversation
        if self.memory:
            body["memory"] = self.memory
            body["remembered"] = self.remembered
        if self.embeddings:
            body["embeddings"] = list(self.embeddings)
        if self.tools_left_out:
            body["tools_left_out"] = list(self.tools_left_out)
        return body

    def continued(self, resumed: int, failovers: int) -> Done:
        """This DONE of a continuation (given `resumed` answer tokens to go on from) as if
        one worker had answered it all: those tokens count as generated, not as prompt."""
        u = self.usage
        prompt = max(0, u.prompt_tokens - resumed)
        usage = replace(u, prompt_tokens=prompt, cached_tokens=min(u.cached_tokens, prompt),
                        completion_tokens=u.completion_tokens + resumed)
        return replace(self, usage=usage, failovers=self.failovers + failovers)


@dataclass(frozen=True, slots=True)
class Error:
    COMMAND: ClassVar[Command] = Command.ERROR
    id: str
    code: ErrorCode
    message: str

    @classmethod
    def from_body(cls, f: _Fields) -> Error:
        code = f.str("code", min_chars=1, max_chars=64)
        try:
            parsed = ErrorCode(code)
        except ValueError:
            parsed = ErrorCode.INTERNAL  # a newer peer's code: keep the message, degrade the code
        return cls(
            id=f.str("id", max_chars=MAX_ID_CHARS, required=False),
            code=parsed,
            message=f.str("message", max_chars=MAX_SMALL_TEXT, required=False),
        )

    def to_body(self) -> dict[str, Any]:
        return {"id": self.id, "code": self.code.value, "message": self.message}


@dataclass(frozen=True, slots=True)
class Cancel:
    COMMAND: ClassVar[Command] = Command.CANCEL
    id: RequestId

    @classmethod
    def from_body(cls, f: _Fields) -> Cancel:
        return cls(id=RequestId(f.str("id", min_chars=1, max_chars=MAX_ID_CHARS)))

    def to_body(self) -> dict[str, Any]:
        return {"id": self.id}


@dataclass(frozen=True, slots=True)
class Disconnect:
    COMMAND: ClassVar[Command] = Command.DISCONNECT
    reason: str = ""
    sessions: tuple[str, ...] = ()
    """A leaving worker's warm sessions: the router forgets that they were warm there."""

    @classmethod
    def from_body(cls, f: _Fields) -> Disconnect:
        return cls(reason=f.str("reason", max_chars=1024, required=False),
                   sessions=f.str_list("sessions", max_items=MAX_LISTED_SESSIONS,
                                       max_chars=MAX_SESSION_CHARS))

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"reason": self.reason}
        if self.sessions:
            body["sessions"] = list(self.sessions)
        return body


@dataclass(frozen=True, slots=True)
class Status:
    """A query (empty `cluster`) or the router's answer: the same map `pichat status --json`
    prints (router fields, `workers`: a list of maps, `queue`: a map)."""

    COMMAND: ClassVar[Command] = Command.STATUS
    cluster: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_body(cls, f: _Fields) -> Status:
        return cls(cluster=f.map("cluster", required=False))

    def to_body(self) -> dict[str, Any]:
        return {"cluster": dict(self.cluster)} if self.cluster else {}


MAX_STATE_PIECE = 1 << 20
"""Bytes of KV state in one STATE message (a state of hundreds of MB goes in pieces)."""
MAX_FORMAT_CHARS = 512


@dataclass(frozen=True, slots=True)
class Migrate:
    COMMAND: ClassVar[Command] = Command.MIGRATE
    transfer: str
    session: SessionId
    target: str = ""
    """The receiving worker's name (for logs)."""

    @classmethod
    def from_body(cls, f: _Fields) -> Migrate:
        return cls(transfer=f.str("transfer", min_chars=1, max_chars=MAX_ID_CHARS),
                   session=SessionId(f.str("session", min_chars=1,
                                           max_chars=MAX_SESSION_CHARS)),
                   target=f.str("target", required=False))

    def to_body(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "session": self.session, "target": self.target}


@dataclass(frozen=True, slots=True)
class State:
    """Piece `seq` of a transfer. Piece 0 describes the state (its session, owner, format,
    token ids, size and SHA-256); every piece may carry bytes; the last says `last`. A
    sender that cannot go on sends `abort` with its reason."""

    COMMAND: ClassVar[Command] = Command.STATE
    transfer: str
    seq: int
    data: bytes = b""
    last: bool = False
    abort: str = ""
    session: str = ""
    owner: str | None = None
    format: str = ""
    tokens: tuple[int, ...] = ()
    data_bytes: int = 0
    nbytes: int = 0
    sha256: str = ""

    @classmethod
    def from_body(cls, f: _Fields) -> State:
        return cls(
            transfer=f.str("transfer", min_chars=1, max_chars=MAX_ID_CHARS),
            seq=f.int("seq", hi=1 << 31),
            data=f.bytes("data", max_bytes=MAX_STATE_PIECE),
            last=f.bool("last"),
            abort=f.str("abort", max_chars=1024, required=False),
            session=f.str("session", max_chars=MAX_SESSION_CHARS, required=False),
            owner=f.str("owner", max_chars=MAX_ID_CHARS, required=False, default=None),
            format=f.str("format", max_chars=MAX_FORMAT_CHARS, required=False),
            tokens=f.int_list("tokens", max_items=MAX_TOKEN_LIST),
            data_bytes=f.int("data_bytes", hi=1 << 40, required=False),
            nbytes=f.int("nbytes", hi=1 << 40, required=False),
            sha256=f.str("sha256", max_chars=64, required=False),
        )

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"transfer": self.transfer, "seq": self.seq}
        if self.data:
            body["data"] = self.data
        if self.last:
            body["last"] = True
        if self.abort:
            body["abort"] = self.abort
        if self.seq == 0 and not self.abort:
            body.update(session=self.session, owner=self.owner, format=self.format,
                        tokens=list(self.tokens), data_bytes=self.data_bytes,
                        nbytes=self.nbytes, sha256=self.sha256)
        return body


@dataclass(frozen=True, slots=True)
class StateAck:
    COMMAND: ClassVar[Command] = Command.STATE_ACK
    transfer: str
    seq: int = 0
    """The pieces up to this one are in."""
    done: bool = False
    """The whole state is in, checked and kept."""
    refused: str = ""
    """Why the receiver will not take it (the sender stops)."""

    @classmethod
    def from_body(cls, f: _Fields) -> StateAck:
        return cls(transfer=f.str("transfer", min_chars=1, max_chars=MAX_ID_CHARS),
                   seq=f.int("seq", hi=1 << 31, required=False),
                   done=f.bool("done"),
                   refused=f.str("refused", max_chars=1024, required=False))

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"transfer": self.transfer, "seq": self.seq}
        if self.done:
            body["done"] = True
        if self.refused:
            body["refused"] = self.refused
        return body


@dataclass(frozen=True, slots=True)
class Conversations:
    """A client's question about its stored conversations, or the router's answer (the
    same `op`, with `result`): `list` (offset, limit: summaries, most recent first), `get`
    (id, offset, limit: the conversation with up to `limit` of its messages from
    `offset`, and `total`), `create` (title: an empty one), `rename` (id, title),
    `delete` (id)."""

    COMMAND: ClassVar[Command] = Command.CONVERSATIONS
    op: str
    ref: str = ""
    """The asker's token, echoed in the answer (or in the ERROR's id)."""
    id: str = ""
    title: str = ""
    offset: int = 0
    limit: int = 100
    result: Any = None
    """The router's answer: a list of maps (list) or a map."""

    OPS: ClassVar[tuple[str, ...]] = ("list", "get", "create", "rename", "delete")

    @classmethod
    def from_body(cls, f: _Fields) -> Conversations:
        op = f.str("op", max_chars=16)
        if op not in cls.OPS:
            raise ProtocolError(f"CONVERSATIONS: op must be one of {list(cls.OPS)}")
        result = f.data.get("result")
        if result is not None and not isinstance(result, (list, Mapping)):
            raise ProtocolError("CONVERSATIONS: result must be a list or a map")
        return cls(op=op, ref=f.str("ref", max_chars=MAX_ID_CHARS, required=False),
                   id=f.str("id", max_chars=MAX_TITLE_CHARS, required=False),
                   title=f.str("title", max_chars=MAX_TITLE_CHARS, required=False),
                   offset=f.int("offset", hi=1 << 31, required=False),
                   limit=f.int("limit", lo=1, hi=1000, required=False, default=100),
                   result=result)

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"op": self.op}
        for key in ("ref", "id", "title", "offset"):
            if getattr(self, key):
                body[key] = getattr(self, key)
        if self.limit != 100:
            body["limit"] = self.limit
        if self.result is not None:
            body["result"] = self.result
        return body


@dataclass(frozen=True, slots=True)
class Join:
    """Joiner -> router: redeem invitation `invitation` with its `secret`, to be admitted
    as `name` (the key is the one the joiner's CURVE handshake proved). Router -> joiner:
    the same with `workers` and `clients`, the router's endpoints, once admitted (as
    bound; then, comma-separated, those of the other routers sharing its store, as
    reached)."""

    COMMAND: ClassVar[Command] = Command.JOIN
    invitation: str
    secret: str
    name: str
    workers: str = ""
    clients: str = ""

    @classmethod
    def from_body(cls, f: _Fields) -> Join:
        return cls(invitation=f.str("invitation", min_chars=1, max_chars=MAX_ID_CHARS),
                   secret=f.str("secret", min_chars=1, max_chars=MAX_ID_CHARS),
                   name=f.str("name", min_chars=1, max_chars=64),
                   workers=f.str("workers", max_chars=MAX_ENDPOINTS_CHARS, required=False),
                   clients=f.str("clients", max_chars=MAX_ENDPOINTS_CHARS, required=False))

    def to_body(self) -> dict[str, Any]:
        return asdict(self)


Message: TypeAlias = (
    Ready | Heartbeat | Request | Chunk | Done | Error | Cancel | Disconnect | Status
    | Migrate | State | StateAck | Conversations | Join
)

_MESSAGE_OBJECTS = 9
"""A message's map, its four keys and their values."""
REQUEST_OBJECTS = MAX_MESSAGES * _MESSAGE_OBJECTS + MAX_EMBED_INPUTS + 2 * MAX_STOP_STRINGS + 256
"""What the largest REQUEST that `Request.from_body` takes decodes to: derived from the
fields' own bounds, so that a request the router built and checked (`check`) is never one a
worker cannot decode (tests/test_protocol.py builds the largest of each kind)."""

LIMITS: dict[Command, Limits] = {
    Command.READY: Limits(objects=2 * MAX_LISTED_SESSIONS + 64, depth=4),
    Command.HEARTBEAT: Limits(objects=MAX_LISTED_SESSIONS + 4 * MAX_WARMED + 64, depth=4,
                              max_str=MAX_SMALL_TEXT),
    Command.REQUEST: Limits(objects=REQUEST_OBJECTS, ints=MAX_TOKEN_LIST, depth=5),
    Command.CHUNK: Limits(objects=64, ints=MAX_TOKEN_LIST, depth=4, max_str=1 << 20),
    Command.DONE: Limits(objects=128 + MAX_EMBED_INPUTS, depth=4, max_str=MAX_EMBED_BYTES),
    Command.ERROR: Limits(objects=64, depth=4, max_str=MAX_SMALL_TEXT),
    Command.CANCEL: Limits(objects=64, depth=4, max_str=MAX_SMALL_TEXT),
    Command.DISCONNECT: Limits(objects=MAX_LISTED_SESSIONS + 64, depth=4, max_str=MAX_SMALL_TEXT),
    Command.STATUS: Limits(objects=1 << 18, depth=8),
    Command.MIGRATE: Limits(objects=64, depth=4),
    Command.STATE: Limits(objects=64, ints=MAX_TOKEN_LIST, depth=4, max_str=MAX_STATE_PIECE),
    Command.STATE_ACK: Limits(objects=64, depth=4, max_str=MAX_SMALL_TEXT),
    Command.CONVERSATIONS: Limits(objects=1 << 16, depth=6),
    Command.JOIN: Limits(objects=64, depth=4, max_str=MAX_SMALL_TEXT),
}
"""What a body of each command may decode to (pichat/unpack.py). Bodies up to 16 KiB
decode in one call whatever these say (at most 16 Ki objects)."""

_TYPES: dict[Command, Any] = {
    cls.COMMAND: cls
    for cls in (Ready, Heartbeat, Request, Chunk, Done, Error, Cancel, Disconnect, Status,
                Migrate, State, StateAck, Conversations, Join)
}
_COMMAND_BYTES: dict[Command, bytes] = {c: bytes((c.value,)) for c in Command}
_BY_BYTE: dict[bytes, Command] = {v: k for k, v in _COMMAND_BYTES.items()}


def encode(message: Message) -> list[bytes]:
    """The frames of `message` (without any routing id)."""
    # A small first buffer: msgpack's default (256 KiB per call) made the router's heap
    # grow under load (allocated and freed for every message); it grows when needed.
    body = msgpack.packb(message.to_body(), buf_size=1024)
    return [TAG, _COMMAND_BYTES[message.COMMAND], body]


def check(message: Message) -> None:
    """ProtocolError if a peer would refuse `message`: the very checks `decode` runs on
    what it reads (the router runs them on each request it builds for a worker)."""
    _TYPES[message.COMMAND].from_body(_Fields(message.COMMAND, message.to_body()))


def _peek_id(body: bytes) -> str | None:
    """The "id" of a body too big to decode, if it is among its first keys (it is the
    first of every body this side writes); read without building what follows."""
    unpacker = msgpack.Unpacker(max_buffer_size=len(body) + 1, raw=False,
                                max_str_len=MAX_ID_CHARS * 4, max_bin_len=0, max_ext_len=0,
                                max_array_len=0, max_map_len=0)
    unpacker.feed(body)
    try:
        pairs = unpacker.read_map_header()
        for _ in range(min(pairs, 4)):
            key = unpacker.unpack()
            if key == "id":
                value = unpacker.unpack()
                return value if isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS \
                    else None
            unpacker.skip()
    except Exception:  # not msgpack, not a map, or a key that is not small: no id
        return None
    return None


def decode(frames: Sequence[bytes]) -> Message:
    """Parse and validate the frames of one message (routing id already removed).

    Raises `ProtocolError`; its `code` is `VERSION` for another protocol version, and its
    `request_id` names the request when the body was readable enough to tell.
    """
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames (tag, command, body), got {len(frames)}")
    tag, command_byte, body = frames
    if tag != TAG:
        if bytes(tag).startswith(_TAG_FAMILY):
            raise ProtocolError(
                f"protocol version {clip(bytes(tag)[len(_TAG_FAMILY):], 16)} is not "
                f"supported; this peer speaks {TAG.decode()}",
                ErrorCode.VERSION,
            )
        raise ProtocolError(f"not a pichat message (first frame must be {TAG.decode()})")
    command = _BY_BYTE.get(bytes(command_byte))
    if command is None:
        raise ProtocolError(f"unknown command {clip(bytes(command_byte), 16)}")
    try:
        data = unpack(body, LIMITS[command])
    except DecodeError as exc:
        error = ProtocolError(f"{command.name}: body {exc}")
        error.request_id = _peek_id(bytes(body)) or ""
        raise error from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{command.name}: body must be a map")
    try:
        return _TYPES[command].from_body(_Fields(command, data))
    except ProtocolError as exc:
        request_id = data.get("id")
        if isinstance(request_id, str) and 0 < len(request_id) <= MAX_ID_CHARS:
            exc.request_id = request_id
        raise
