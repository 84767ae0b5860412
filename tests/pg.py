"""A throwaway PostgreSQL server for tests: Debian's server binaries, a Unix socket in a temp dir
(no TCP port to collide with), durability off. `start_postgres()` gives a `PostgresServer`, or
raises `PostgresUnavailable` saying what is missing (tests then skip with that reason)."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import _free_port


class PostgresUnavailable(Exception):
    pass



def _pg_bindir() -> Path | None:
    """The newest server installed by Debian's postgresql packages, or one given by WRENN_TEST_PG_BIN."""
    if os.environ.get("WRENN_TEST_PG_BIN"):
        return Path(os.environ["WRENN_TEST_PG_BIN"])
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")]
    found += [Path(p).parent for p in [shutil.which("initdb")] if p]
    found.sort(key=lambda d: [int(x) for x in re.findall(r"\d+", str(d))] or [0])
    return found[-1] if found else None


@dataclasses.dataclass
class PostgresServer:
    socket_dir: Path
    port: int
    _names: Iterator[int] = dataclasses.field(default_factory=itertools.count)
    _free: list[str] = dataclasses.field(default_factory=list)

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@/{dbname}?host={self.socket_dir}&port={self.port}"

    def connect(self, dbname: str = "postgres"):  # type: ignore[no-untyped-def]
        import psycopg

        return psycopg.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname=dbname,
                               autocommit=True)

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """An empty database (its URL) for one test. Afterwards its connections are ended and its
        schema emptied, and it is handed out again: much quicker than CREATE DATABASE each time."""
        if self._free:
            name = self._free.pop()
        else:
            name = f"t{next(self._names)}"
            with self.connect() as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with self.connect(name) as conn:  # end whatever the test left open, then empty it
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                             "WHERE datname = current_database() AND pid <> pg_backend_pid()")
                conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
            self._free.append(name)


@contextlib.contextmanager
def start_postgres() -> Iterator[PostgresServer]:
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "pg_ctl").exists():
        raise PostgresUnavailable("PostgreSQL server binaries not found (apt-get install postgresql; "
                                  "scripts/setup.sh does)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable("psycopg is not installed (pip install 'psycopg[binary]')") from None

    # initdb refuses to run as root: then the server runs as the `postgres` user (from the package).
    as_user: list[str] = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("running as root, and runuser is missing to start PostgreSQL as `postgres`")
        as_user = ["runuser", "-u", "postgres", "--"]
    # Not under pytest's tmp dir: that one is private to the user running the tests.
    tmp = Path(tempfile.mkdtemp(prefix="wrenn-pg-"))
    if as_user:
        shutil.chown(tmp, "postgres", "postgres")
    data, log = tmp / "data", tmp / "server.log"
    port = _free_port()

    def run(*args: str) -> None:
        proc = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            extra = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{args[0]} failed: {proc.stdout}{proc.stderr}{extra}")

    try:
        run(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
            f"-k {tmp} -p {port} -c listen_addresses='' -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c max_connections=300", "start")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        yield PostgresServer(tmp, port)
    finally:
        subprocess.run([*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)
