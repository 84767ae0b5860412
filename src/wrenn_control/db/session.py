"""Engine and sessions.

Sessions are short: open, do the work, commit, close, with no await in between. Everything runs on
the event loop thread, so a session held across an await (on the host agent, or on a concurrent
request) could keep a transaction or a pooled connection that another coroutine then blocks on.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool, StaticPool


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer; busy_timeout: wait instead of failing on a brief lock.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=5000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()


class Database:
    def __init__(self, url: str):
        self.url = url
        parsed = make_url(url)
        kwargs: dict[str, Any] = {}
        if parsed.get_backend_name() == "sqlite":
            memory = not parsed.database or parsed.database == ":memory:"
            if not memory:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False}
            # DB calls run on the event loop thread: a pool that can run dry would block the loop
            # (and with it every session that could give a connection back). Opening a SQLite
            # file is cheap, so: no pool.
            kwargs["poolclass"] = StaticPool if memory else NullPool
        else:
            kwargs["max_overflow"] = -1  # same reason: never make the event loop wait for a connection
        self.engine: Engine = create_engine(url, **kwargs)
        if parsed.get_backend_name() == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()
