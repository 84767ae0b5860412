"""Engine and sessions.

Code on the event loop never touches the database itself: `await db.run(fn, ...)` runs
`fn(session, ...)` in one of the database's worker threads, with a fresh session, and returns its
result. A lock wait or a slow round trip then stalls one worker thread, not every request, stream
and exec relay of the process. A job is one transaction: its reads and the writes they decide
stay together (no await can come between them). ORM rows come back detached, with the attributes
loaded by the job readable (`expire_on_commit=False`); nothing lazy-loads after.

- SQLite: one worker thread. This process's database work is serialized, so a check-then-write
  in one job is atomic here, as it has to be with SQLite's single writer anyway.
- PostgreSQL: `threads` workers (default 8), the connection pool sized to match. Jobs run
  concurrently (and other replicas too): a check-then-write locks what it checks (`SELECT ...
  FOR UPDATE`) or is one conditional UPDATE.

`session()` stays for what does not run on the loop: start-up before serving, migrations, the CLI,
tests.

Two backends, the same models and migrations: a SQLite file (the default) or PostgreSQL
(`postgresql://...`, driven by psycopg 3).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from sqlalchemy import create_engine, event
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

P = ParamSpec("P")
T = TypeVar("T")

# How long a statement may wait for a lock held by another connection before it fails, in ms. A
# wait holds one worker thread (and the request waiting for it), so it is bounded; the same bound
# as SQLite's busy_timeout below.
LOCK_TIMEOUT_MS = 5000
CONNECT_TIMEOUT_SEC = 10
DEFAULT_THREADS = 8
# Connections beyond one per worker thread, for the sync `session()` users (start-up, the CLI,
# tests) next to a busy pool.
POOL_OVERFLOW = 4


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


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()



# Jobs for `Database.run` that many callers need.

def execute_committed(session: Session, stmt: Any) -> int:
    """One statement (UPDATE, DELETE), committed: how many rows it changed."""
    count = session.execute(stmt).rowcount  # type: ignore[attr-defined]
    session.commit()
    return int(count)


def add_committed(session: Session, row: Any) -> None:
    """One new row, committed."""
    session.add(row)
    session.commit()

class Database:
    def __init__(self, url: str, *, threads: int = DEFAULT_THREADS):
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
            self.threads = 1  # one writer: serialized here rather than by busy waits
            # Pooled, not opened per session: opening + the pragmas cost ~1 ms, and a create runs
            # several jobs. One connection for the worker, a few for sync `session()` users.
            if memory:
                kwargs["poolclass"] = StaticPool
            else:
                kwargs.update(pool_size=1, max_overflow=POOL_OVERFLOW)
        else:
            # One connection per worker thread (a job holds one for its whole transaction), a few
            # more for sync `session()` users; bounded, since waiting for one now blocks a worker
            # thread, not the event loop. The idle ones are pinged before use so that a database
            # restart costs no failed request.
            self.threads = max(1, threads)
            kwargs.update(pool_size=self.threads, max_overflow=POOL_OVERFLOW, pool_pre_ping=True)
            if self.backend == "postgresql" and parsed.get_driver_name() in ("psycopg", "psycopg2"):
                connect_args: dict[str, Any] = {}
                if "connect_timeout" not in parsed.query:  # connecting holds a worker thread too
                    connect_args["connect_timeout"] = CONNECT_TIMEOUT_SEC
                if "options" not in parsed.query:
                    connect_args["options"] = f"-c lock_timeout={LOCK_TIMEOUT_MS}"
                kwargs["connect_args"] = connect_args
        self.engine: Engine = create_engine(parsed, **kwargs)
        if self.backend == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._executor: ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()
        self.worker_threads: set[int] = set()  # their idents (tests check that the loop did no DB work)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in the calling thread: only off the event loop (start-up, CLI, tests)."""
        with self._sessions() as session:
            yield session

    async def run(self, fn: Callable[Concatenate[Session, P], T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(session, *args, **kwargs)` in a worker thread with a fresh session; its result.
        `fn` commits what it writes (an uncommitted job is rolled back when its session closes).
        The context (e.g. the request's actor) is the caller's. A job once submitted runs to its
        end even if the caller is cancelled meanwhile (a lease's release in a `finally`, a
        transition of a cancelled boot): what it did is then as if the caller had waited."""
        job = functools.partial(self._job, fn, args, kwargs)
        ctx = contextvars.copy_context()
        fut = asyncio.get_running_loop().run_in_executor(self._pool(), ctx.run, job)
        fut.add_done_callback(_retrieve)  # a cancelled caller's job failing is not worth a log line
        return await asyncio.shield(fut)

    def _job(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        with self._sessions() as session:
            return fn(session, *args, **kwargs)

    def _pool(self) -> ThreadPoolExecutor:
        with self._executor_lock:  # made on first use (and again after a dispose), as the engine's pool is
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="wrenn-db",
                                                    initializer=self._started)
            return self._executor

    def _started(self) -> None:
        self.worker_threads.add(threading.get_ident())

    def dispose(self) -> None:
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)  # jobs are short (lock waits are bounded)
        self.engine.dispose()
