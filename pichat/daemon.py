"""What a pichat daemon (router or worker) does as a process: how it stops (one path for
both), and the process resources it takes.

The first SIGTERM or SIGINT asks it to drain: take nothing new, let what runs finish (up
to its drain timeout), then leave cleanly. A second one exits at once: a worker's
generation thread may be deep in a long prompt, and the operator has said twice.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import resource
import signal
from collections.abc import Callable

__all__ = ["on_stop_signals", "give_big_buffers_back", "raise_fd_limit"]

M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter."""

log = logging.getLogger(__name__)


def on_stop_signals(loop: asyncio.AbstractEventLoop, drain: Callable[[str], None]) -> None:
    """Call `drain(signal name)` on the first SIGTERM/SIGINT; exit at once on the second."""
    state = {"signalled": False}

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if state["signalled"]:
            log.warning("second %s: exiting now", name)
            logging.shutdown()
            os._exit(1)
        state["signalled"] = True
        drain(name)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)


def give_big_buffers_back() -> None:
    """Big buffers (a peer's large frames, which libzmq allocates and CURVE decrypts)
    go back to the system when freed. glibc raises its mmap threshold to the size of the
    largest block freed so far, so after one 1 MiB frame every later one came from a heap
    that is never trimmed: measured, a router kept +64 MB after three 192 MiB multipart
    messages. A fixed threshold keeps such blocks mapped, and unmapped on free."""
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc
        pass


def raise_fd_limit() -> None:
    """Every connection (ZeroMQ or HTTP) costs a file descriptor: use all we may have."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
