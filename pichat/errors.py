"""pichat's exceptions: one small hierarchy, each carrying the wire error code it maps to."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ErrorCode",
    "PichatError",
    "ProtocolError",
    "BadRequest",
    "ContextTooLong",
    "RouterUnavailable",
    "RequestFailed",
    "ModelNotFound",
]


class ErrorCode(StrEnum):
    """The `code` of an ERROR message. Clients may branch on these; they never change meaning."""

    PROTOCOL = "protocol"
    """The message could not be decoded: wrong frames, bad msgpack, a field of the wrong type."""
    VERSION = "version"
    """The peer speaks another version of the protocol."""
    BAD_REQUEST = "bad_request"
    """The message decoded but asks for something invalid (duplicate id, unknown model...)."""
    CONTEXT_LENGTH = "context_length"
    """The prompt does not fit in the model's context window."""
    BUSY = "busy"
    """Every slot is busy and the queue is full: retry later."""
    NO_WORKERS = "no_workers"
    """No live worker can serve the request."""
    TIMEOUT = "timeout"
    """The request passed its deadline (waiting in the queue or generating)."""
    WORKER_LOST = "worker_lost"
    """The worker died after it had started streaming; the answer is incomplete."""
    CANCELLED = "cancelled"
    """The request was cancelled."""
    INTERNAL = "internal"
    """A bug or a backend failure; the log has details."""


class PichatError(Exception):
    """Base of all pichat errors. `code` is what goes on the wire."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ProtocolError(PichatError):
    """A message from the network that does not follow the protocol."""

    code = ErrorCode.PROTOCOL
    request_id: str = ""
    """The request the bad message was about, when that much could be read."""


class BadRequest(PichatError):
    code = ErrorCode.BAD_REQUEST


class ContextTooLong(PichatError):
    code = ErrorCode.CONTEXT_LENGTH


class RouterUnavailable(PichatError):
    """The client heard nothing from the router for longer than its liveness allows."""

    code = ErrorCode.TIMEOUT


class RequestFailed(PichatError):
    """The router or a worker answered a request with an ERROR."""


class ModelNotFound(PichatError):
    code = ErrorCode.BAD_REQUEST
