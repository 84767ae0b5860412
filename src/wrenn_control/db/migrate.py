"""Run the Alembic migrations programmatically (at every start; a no-op when up to date)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from wrenn_control.db.session import Database

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
# PostgreSQL: a transaction-level advisory lock, so that two control planes starting at once on one
# database migrate one after the other (the second then finds nothing to do). Any constant will do.
_MIGRATION_LOCK_ID = 0x77_72_65_6E_6E  # "wrenn"


def alembic_config(db: Database) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", db.url.replace("%", "%%"))
    return cfg


def run_migrations(db: Database) -> None:
    cfg = alembic_config(db)
    with db.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Nothing is served yet: waiting for the other instance's migration, or for the DDL's
            # table locks, may take longer than a request's lock wait (see db/session.py).
            connection.execute(text("SET LOCAL lock_timeout = '60s'"))
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")
