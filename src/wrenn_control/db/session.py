"""Engine and sessions.

Sessions are short: open, do the work, commit, close, with no await in between. Everything runs on
the event loop thread, so a session held across an await (on the host agent, or on a concurrent
request) could keep a transaction or a pooled connection that another coroutine then blocks on.

Two backends, the same models and migrations: a SQLite file (the default) or PostgreSQL
(`postgresql://...`, driven by psycopg 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

# How long a statement may wait for a lock held by another connection (another process: this one
# never holds a transaction across an await) before it fails, in ms. A wait blocks the event loop,
# so it must be bounded; the same bound as SQLite's busy_timeout below.
LOCK_TIMEOUT_MS = 5000
CONNECT_TIMEOUT_SEC = 10


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; busy_timeout: wait instead of failing on a brief lock.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


def normalize_url(url: str) -> URL:
    """`postgresql://` and `postgres://` (as libpq and most hosting providers write it) mean
    psycopg 3, the driver this package installs; SQLAlchemy would pick psycopg2 or fail."""
    parsed = make_url(url)
    if parsed.drivername in ("postgres", "postgresql"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


class Database:
    def __init__(self, url: str):
        parsed = normalize_url(url)
        self.url = url if parsed.drivername == make_url(url).drivername else parsed.render_as_string(
            hide_password=False)
        self.backend = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.backend == "sqlite":
            memory = not parsed.database or parsed.database == ":memory:"
            if not memory:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
            # DB calls run on the event loop thread: a pool that can run dry would block the loop
            # (and with it every session that could give a connection back), so its overflow is
            # unbounded. Pooled, not opened per session: opening + the pragmas cost ~1 ms, and a
            # create opens ~10 sessions.
            if memory:
                kwargs["poolclass"] = StaticPool
            else:
                kwargs.update(pool_size=5, max_overflow=-1)
        else:
            # A pool whose overflow is unbounded: same reason, never make the event loop wait for a
            # connection. Few are ever checked out at once (no session lives across an await, but
            # for read-only request sessions), so pool_size stays the default; the idle ones are
            # pinged before use so that a database restart costs no failed request.
            kwargs.update(pool_size=5, max_overflow=-1, pool_pre_ping=True)
            if self.backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
                connect_args: dict[str, Any] = {}
                if "connect_timeout" not in parsed.query:  # connecting blocks the event loop too
                    connect_args["connect_timeout"] = CONNECT_TIMEOUT_SEC
                if "options" not in parsed.query:
                    connect_args["options"] = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
                kwargs["connect_args"] = connect_args
        self.engine: Engine = create_engine(parsed, **kwargs)
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
