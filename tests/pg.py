"""A real PostgreSQL server for the tests (Debian's package: /usr/lib/postgresql/N/bin),
started in a private directory, listening on a Unix socket there only (no TCP port):
`PostgresServer.start()` returns None with the reason when it cannot start here."""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["PostgresServer"]


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


class PostgresServer:
    def __init__(self, root: Path, run_as: list[str]) -> None:
        self.root = root
        self.run_as = run_as
        self.data = root / "data"
        self.socket = root / "socket"

    @classmethod
    def start(cls) -> tuple[PostgresServer | None, str]:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            return None, "PostgreSQL is not installed (apt-get install postgresql)"
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return None, "psycopg is not installed (pip install 'psycopg[binary,pool]')"
        root = Path(tempfile.mkdtemp(prefix="pichat-pg-"))
        run_as: list[str] = []
        if os.geteuid() == 0:  # the server refuses to run as root: as its own user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(root, ignore_errors=True)
                return None, "running as root and there is no postgres user to run it as"
            os.chown(root, user.pw_uid, user.pw_gid)
            run_as = ["runuser", "-u", "postgres", "--"]
        server = cls(root, run_as)
        try:
            server._run([initdb, "-D", str(server.data), "-A", "trust", "-U", "postgres",
                         "--no-sync", "-E", "UTF8"])
            server._run(["mkdir", "-p", str(server.socket)])
            server._run([pg_ctl, "-D", str(server.data), "-l", str(root / "log"), "-w",
                         "-t", "60", "-o",
                         f"-k {server.socket} -c listen_addresses='' -c fsync=off", "start"])
        except (OSError, subprocess.CalledProcessError) as exc:
            log = root / "log"
            detail = log.read_text()[-500:] if log.exists() else str(exc)
            shutil.rmtree(root, ignore_errors=True)
            return None, f"PostgreSQL did not start here: {detail.strip()}"
        return server, ""

    def _run(self, argv: list[str]) -> None:
        subprocess.run([*self.run_as, *argv], check=True, capture_output=True, timeout=120)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@/{db}?host={self.socket}"

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        import psycopg

        name = "t_" + secrets.token_hex(6)
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run([_bin("pg_ctl") or "pg_ctl", "-D", str(self.data), "-m", "immediate",
                       "stop"])
        except (OSError, subprocess.CalledProcessError):
            pass
        shutil.rmtree(self.root, ignore_errors=True)
