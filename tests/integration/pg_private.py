"""A private PostgreSQL server for tests that stop and start it (a real restart mid-run).

The system server on 127.0.0.1:5432 is shared by concurrent test runs and is never stopped; this
one is a fresh cluster made with the installed server's own ``initdb`` and driven with ``pg_ctl``:
trust authentication, one free loopback port, no Unix socket, ``fsync=off`` (the operating system
still has every write, so even an ``immediate`` stop keeps each acknowledged commit, as on a real
server; ``synchronous_commit`` stays on for the same reason). Its data directory is
under the test's ``tmp_path``; when the tests run as root (``initdb`` and ``pg_ctl`` refuse to), the
server runs as the ``postgres`` system user from a directory of its own under the system's
temporary directory (``tmp_path`` is private to root), removed afterwards.

A test module takes the fixture with ``private_pg = pg_private.private_pg``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

#: Seconds ``pg_ctl`` waits for the server to start or stop.
PG_CTL_TIMEOUT = 60


def server_bin_dir() -> Path | None:
    """The directory of the newest installed server's ``initdb`` and ``pg_ctl`` (None: no server)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def free_port() -> int:
    """A loopback TCP port nobody listens on (now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """One private cluster: ``init`` once, then ``start``/``stop`` as often as a test needs.

    Args:
        bin_dir: where ``initdb``, ``pg_ctl`` live.
        base: a directory for the cluster (data directory and server log), owned by ``run_as``.
        port: the loopback port it listens on.
        run_as: the system user running the server (None: this process's user).
    """

    def __init__(self, bin_dir: Path, base: Path, port: int, run_as: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.base = base
        self.data = base / "data"
        self.logfile = base / "server.log"
        self.port = port
        self._run_as = run_as
        self.running = False

    @property
    def url(self) -> str:
        """URL of its ``postgres`` database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, timeout: float = PG_CTL_TIMEOUT + 30) -> None:
        user = self._run_as
        proc = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]], cwd=self.base, capture_output=True, text=True,
            timeout=timeout, check=False, env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            user=user.pw_uid if user is not None else None, group=user.pw_gid if user is not None else None)
        if proc.returncode != 0:
            log = self.logfile.read_text(errors="replace")[-2000:] if self.logfile.exists() else ""
            raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()} {log}")

    def init(self) -> None:
        """Create the cluster (``initdb``) and configure it."""
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                  "--locale=C", "--no-sync", "--no-instructions")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# private test server\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       "unix_socket_directories = ''\nfsync = off\n"
                       "full_page_writes = off\nshared_buffers = 32MB\nmax_connections = 40\n")

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-w", "-t", str(PG_CTL_TIMEOUT),
                  "start")
        self.running = True
        deadline = time.monotonic() + PG_CTL_TIMEOUT
        while True:
            try:
                with psycopg.connect(self.url, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clients disconnected, clean shutdown) or ``immediate`` (like a
        crash: no shutdown checkpoint, recovery at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(PG_CTL_TIMEOUT), "stop")
        self.running = False


@pytest.fixture
def private_pg(tmp_path: Path) -> Iterator[PrivatePostgres]:
    """A started private PostgreSQL server the test may stop and start; skips without ``initdb``."""
    bin_dir = server_bin_dir()
    if bin_dir is None or not (bin_dir / "pg_ctl").exists():
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) installed")
    run_as: pwd.struct_passwd | None = None
    owned: Path | None = None
    if os.geteuid() == 0:
        try:
            run_as = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run a private server as")
        owned = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
        os.chown(owned, run_as.pw_uid, run_as.pw_gid)
        base = owned
    else:
        base = tmp_path / "pg"
        base.mkdir()
    server = PrivatePostgres(bin_dir, base, free_port(), run_as)
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                server.stop("immediate")
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
