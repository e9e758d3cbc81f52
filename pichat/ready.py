"""A daemon says it is ready only once everything it serves is up.

Two ways, both optional: systemd's notify protocol (`Type=notify` units: READY=1 on the
datagram socket named by $NOTIFY_SOCKET), and a ready file (`--ready-file PATH`): a JSON
object of the endpoints actually bound (port 0 resolved), written atomically, so a test
or a script can bind port 0 and read where the daemon listens instead of guessing a free
port.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Any

__all__ = ["announce_ready"]

log = logging.getLogger(__name__)


def announce_ready(ready_file: str, endpoints: dict[str, Any]) -> None:
    if ready_file:
        path = Path(ready_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**endpoints, "pid": os.getpid()}))
        os.replace(tmp, path)
    _sd_notify(b"READY=1")


def _sd_notify(message: bytes) -> None:
    target = os.environ.get("NOTIFY_SOCKET")
    if not target:
        return
    address = "\0" + target[1:] if target.startswith("@") else target
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot notify systemd (%s): %s", target, exc)
