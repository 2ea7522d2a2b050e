"""The DuckDB file lock across real processes: readers and writers wait, then fail naming the file."""

import subprocess
import sys
import time

import pytest

from ktoloop.migrations import MIGRATIONS
from ktoloop.store import Store, StoreLockedError

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
