"""The DuckDB file lock across real processes: readers and writers wait, then fail naming the file."""

import subprocess
import sys
import time

import pytest

from ktoloop.migrations import MIGRATIONS
from ktoloop.store import Store, StoreLockedError, applied_versions

HOLD = "import duckdb, sys, time; c = duckdb.connect(sys.argv[1]); print('held', flush=True); time.sleep(float(sys.argv[2]))"


def hold_file(path, seconds):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_migrations_apply_once_in_order(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    store.init()
    Store(tmp_path / "k.duckdb").init()  # a second open applies nothing twice
    versions = store.read("SELECT version FROM schema_version ORDER BY version")["version"].to_list()
    assert versions == sorted(v for v, _, _ in MIGRATIONS)


def test_a_file_of_the_old_schema_keeps_its_decisions_in_the_decisions_table(tmp_path):
    """Migration 201 moves each snapshot's decision (once stored in ``datasets``) into ``decisions``."""
    import duckdb

    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        applied_versions(con)  # the bookkeeping table, as the store creates it
        for version, name, sql in sorted(m for m in MIGRATIONS if m[0] < 201):
            con.execute(sql)
            con.execute("INSERT INTO schema_version VALUES (?, ?, now())", [version, name])
        con.execute("INSERT INTO datasets VALUES ('ds-old', 'h', 'v1', '/p', '{}', ?, '{}', '{}', '{}', now())",
                    ['{"method": "kto", "train": true, "reasons": ["kto: first eligible"]}'])
    store = Store(path)
    store.init()
    assert store.read("SELECT snapshot_id, method, train FROM decisions").rows() == [("ds-old", "kto", True)]
    assert "decision" not in store.read("SELECT * FROM datasets").columns


@pytest.mark.slow
def test_reader_and_writer_wait_for_another_process(tmp_path):
    store = Store(tmp_path / "k.duckdb", lock_timeout_s=20)
    store.init()
    holder = hold_file(store.path, 1.5)
    started = time.monotonic()
    assert store.scalar("SELECT count(*) FROM feedback") == 0  # read-only open had to wait
    assert time.monotonic() - started > 0.5
    holder.wait()
    holder = hold_file(store.path, 1.0)
    with store.writer() as con:
        con.execute("INSERT INTO ingest_batches VALUES ('g', 1, 0, 0, now())")
    holder.wait()
    assert store.scalar("SELECT count(*) FROM ingest_batches") == 1


def test_bounded_wait_names_the_file(tmp_path):
    store = Store(tmp_path / "k.duckdb", lock_timeout_s=0.5)
    store.init()
    holder = hold_file(store.path, 3)
    try:
        with pytest.raises(StoreLockedError, match=r"k\.duckdb stayed locked"):
            store.read("SELECT 1")
    finally:
        holder.kill()


def test_writer_rolls_back_on_error(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    with pytest.raises(RuntimeError):
        with store.writer() as con:
            con.execute("INSERT INTO ingest_batches VALUES ('g', 1, 0, 0, now())")
            raise RuntimeError("boom")
    assert store.scalar("SELECT count(*) FROM ingest_batches") == 0
