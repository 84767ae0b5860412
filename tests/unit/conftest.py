"""The control plane's unit tests run on both databases it supports: every test in a
`test_control_*` module runs once on SQLite (the default: a file in the data dir) and once on
PostgreSQL (a throwaway server started for the session, an empty database per test).

The database reaches the app the way an operator gives it: WRENN_DATABASE_URL (read by
`Settings`). Tests that open a `Database` themselves use the `database_url` fixture.

WRENN_TEST_DATABASES=sqlite (or =postgres) runs one backend only, e.g. for quick iteration.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.pg import PostgresServer, PostgresUnavailable, start_postgres

BACKENDS = tuple(b for b in ("sqlite", "postgres")
                 if b in (os.environ.get("WRENN_TEST_DATABASES") or "sqlite,postgres").split(","))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # (a test that asks for `postgres_url` itself is about PostgreSQL only)
    if ("database_url" in metafunc.fixturenames and "postgres_url" not in metafunc.fixturenames
            and metafunc.module.__name__.rsplit(".", 1)[-1].startswith("test_control_")):
        metafunc.parametrize("database_url", BACKENDS, indirect=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    if "postgres" not in BACKENDS:
        pytest.skip("PostgreSQL deselected by WRENN_TEST_DATABASES")
    try:
        with start_postgres() as server:
            yield server
    except PostgresUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty PostgreSQL database for one test (PostgreSQL-only tests ask for it directly)."""
    with postgres_server.database() as url:
        yield url


@pytest.fixture(autouse=True)
def database_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The database for this test's control plane: SQLite in tmp_path (what `Settings` picks by
    default for a data dir of tmp_path) or a fresh PostgreSQL database, put in WRENN_DATABASE_URL.
    Autouse, so that every control-plane test runs on both without asking."""
    backend = getattr(request, "param", "sqlite")
    if backend == "sqlite":
        monkeypatch.delenv("WRENN_DATABASE_URL", raising=False)
        return f"sqlite:///{request.getfixturevalue('tmp_path')}/wrenn.db"
    url = request.getfixturevalue("postgres_url")
    monkeypatch.setenv("WRENN_DATABASE_URL", url)
    return url
