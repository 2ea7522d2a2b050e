"""DuckDB access for every stage: short read-write transactions, read-only queries, both retrying on the lock.

While one process holds a DuckDB file read-write, no other process can open it at all, not even
read-only. So nobody keeps the file open: the writer opens it for one flush, readers open it read-only
for one query, and both retry with bounded, jittered back-off before failing with the file's name.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from ktoloop.errors import TransientError
from ktoloop.migrations import MIGRATIONS

log = logging.getLogger(__name__)


class StoreLockedError(TransientError):
    pass


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc)
    return "Could not set lock" in text or "Conflicting lock" in text


class Store:
    """One DuckDB file. ``writer()`` for a transaction, ``read()`` for a polars DataFrame."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._migrated = False

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.005
        attempts = 0
        while True:
            attempts += 1
            try:
                con = duckdb.connect(str(self.path), read_only=read_only)
                con.execute("SET enable_progress_bar = false")  # long queries would draw bars into logs
                return con
            except duckdb.IOException as exc:
                if not _is_lock_error(exc):
                    raise
                if time.monotonic() + delay > deadline:
                    mode = "read-only" if read_only else "read-write"
                    raise StoreLockedError(
                        f"DuckDB file {self.path} stayed locked by another process for "
                        f"{self.lock_timeout_s:.0f} s ({attempts} attempts to open it {mode}); "
                        "is a long-running process holding it open?"
                    ) from exc
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 0.25)

    @contextlib.contextmanager
    def writer(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open read-write, run the body in one transaction, commit, close. Roll back on error."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = self._connect(read_only=False)
        try:
            if not self._migrated:
                migrate(con)
                self._migrated = True
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
        finally:
            con.close()

    @contextlib.contextmanager
    def reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open read-only for the body (keep it short), then close."""
        if not self.path.exists():
            self.init()
        con = self._connect(read_only=True)
        try:
            yield con
        finally:
            con.close()

    def read(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run one query read-only and return a polars DataFrame."""
        with self.reader() as con:
            return con.sql(sql, params=params).pl()

    def scalar(self, sql: str, params: list[Any] | None = None) -> Any:
        with self.reader() as con:
            row = con.execute(sql, params or []).fetchone()
            return None if row is None else row[0]

    def init(self) -> None:
        """Create the file and apply migrations."""
        with self.writer():
            pass


def applied_versions(con: duckdb.DuckDBPyConnection) -> set[int]:
    con.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMPTZ DEFAULT current_timestamp)")
    return {int(v) for (v,) in con.execute("SELECT version FROM schema_version").fetchall()}


def migrate(con: duckdb.DuckDBPyConnection) -> None:
    """Apply, in version order, each forward migration this file has not seen yet (one transaction each)."""
    applied = applied_versions(con)
    for version, name, sql in sorted(MIGRATIONS):
        if version in applied:
            continue
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
        except duckdb.Error:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        log.info("DuckDB schema migrated to version %d (%s)", version, name)
