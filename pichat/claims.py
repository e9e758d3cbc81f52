"""Directories held by one process: a worker's state directory, a joined worker's keys.

Replicas of one service (compose's `deploy.replicas`) share a volume and one
configuration; `PARENT/*` lets each take a numbered directory of its own under PARENT,
the first no other live process holds (an flock on DIR/.lock, released when the process
dies, so a restarted replica takes its directory back).
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

from pichat.errors import PichatError

__all__ = ["MAX_SHARERS", "claim", "is_pattern"]

MAX_SHARERS = 64


def is_pattern(spec: str) -> bool:
    return Path(spec).name == "*"


def claim(spec: str, what: str, option: str) -> tuple[Path, IO[str]]:
    """The directory `spec` names, held for this process (made if missing; hold the
    returned file open while using it); for `PARENT/*`, the first numbered one under
    PARENT that no other process holds. `what` and `option` name it in errors."""
    if not is_pattern(spec):
        return Path(spec), _hold(Path(spec), what, option)
    parent = Path(spec).parent
    for n in range(MAX_SHARERS):
        try:
            return parent / str(n), _hold(parent / str(n), what, option)
        except _InUse:
            continue
    raise PichatError(f"all {MAX_SHARERS} directories under {parent} are in use by other "
                      f"{what}s")


class _InUse(PichatError):
    pass


def _hold(directory: Path, what: str, option: str) -> IO[str]:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        f = open(directory / ".lock", "a+")  # noqa: SIM115 (held open while it is used)
    except OSError as exc:
        raise PichatError(f"cannot use {directory} ({option}): {exc.strerror}") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise _InUse(f"{directory} is in use by another {what}: give each {what} "
                     f"{option} of its own (or share PARENT/* among replicas)") from None
    return f
