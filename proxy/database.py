"""Opening the log database and bringing its schema up to date.

The schema changes only through the numbered SQL files in ``migrations/`` (shipped inside the
wheel as ``proxy/migrations``); each applied file is recorded in ``schema_migrations``.
"""

from __future__ import annotations

import os
import re
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path

import sqlite_utils

_MIGRATION_NAME = re.compile(r"^(\d+)_([\w-]+)\.sql$")


class SchemaError(RuntimeError):
    """The database cannot be used by this version of the proxy."""


class NewerSchemaError(SchemaError):
    """The database was written by a newer proxy: using it could damage it."""


class DatabasePathError(SchemaError):
    """The database file cannot be created or opened where it was asked for."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def migrations_dir() -> Path:
    """Where the migrations are: inside the installed package, or beside it in a checkout."""
    packaged = resources.files("proxy") / "migrations"
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "migrations"


def available_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found = []
    for path in sorted(directory.iterdir()):
        match = _MIGRATION_NAME.match(path.name)
        if match:
            found.append(Migration(int(match[1]), match[2], path.read_text("utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise SchemaError(f"duplicate migration numbers in {directory}")
    return sorted(found, key=lambda m: m.version)


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating it private to its user) the database file, tuned for a write-ahead log."""
    path = Path(path)
    empty = True
    if str(path) != ":memory:":
        if path.is_dir():
            raise DatabasePathError(f"cannot create the log database at {path}: a directory")
        folder = next((p for p in path.parents if p.exists()), None)
        if folder is not None and not folder.is_dir():
            raise DatabasePathError(f"cannot create the log database at {path}: {folder} is a file")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if not path.exists():
                os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)
            empty = path.stat().st_size == 0
        except OSError as error:
            raise DatabasePathError(
                f"cannot create the log database at {path}: {error.strerror or error}"
            ) from None
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    if empty:  # only a file without tables can choose: retention then shrinks it as it prunes
        conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")  # a commit survives kill -9; fsync at checkpoints
    conn.execute("PRAGMA foreign_keys = ON")
    for suffix in ("-wal", "-shm"):
        side = Path(f"{path}{suffix}")
        if side.exists():
            os.chmod(side, 0o600)
    return conn


def applied_versions(db: sqlite_utils.Database) -> set[int]:
    if "schema_migrations" not in db.table_names():
        return set()
    return {row[0] for row in db.execute("SELECT version FROM schema_migrations")}


def migrate(conn: sqlite3.Connection, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the migrations not yet applied, each in its own transaction; return their numbers."""
    migrations = available_migrations() if migrations is None else migrations
    db = sqlite_utils.Database(conn)
    db.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     INTEGER PRIMARY KEY,
            name        TEXT NOT NULL,
            applied_at  TEXT NOT NULL
        )
        """
    )
    done = applied_versions(db)
    known = {m.version for m in migrations}
    newer = sorted(done - known)
    if newer:
        raise NewerSchemaError(
            f"the log database has schema version {max(done)}, newer than this proxy knows "
            f"(up to {max(known, default=0)}): upgrade jupyter-replay-proxy or use another --db"
        )
    applied = []
    for migration in migrations:
        if migration.version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _statements(migration.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, datetime.now(timezone.utc).isoformat()),
            )
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        applied.append(migration.version)
    return applied


def _statements(sql: str) -> list[str]:
    """Split a migration file into statements (sqlite3 runs one per execute inside BEGIN)."""
    statements, current = [], []
    for line in sql.splitlines(keepends=True):
        current.append(line)
        candidate = "".join(current)
        if candidate.rstrip().endswith(";") and sqlite3.complete_statement(candidate):
            statements.append(candidate)
            current = []
    rest = "".join(current).strip()
    if rest and not all(line.strip().startswith("--") for line in rest.splitlines()):
        statements.append(rest)
    return statements


def open_database(path: str | Path) -> sqlite3.Connection:
    """Connect and migrate: what the proxy does at start-up."""
    try:
        conn = connect(path)
    except sqlite3.DatabaseError as error:
        raise SchemaError(f"cannot use {path} as the log database: {error}") from error
    try:
        migrate(conn)
    except sqlite3.DatabaseError as error:
        conn.close()
        raise SchemaError(f"cannot use {path} as the log database: {error}") from error
    except SchemaError:
        conn.close()
        raise
    return conn
