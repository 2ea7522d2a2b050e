"""Ingestion against the real Tansu broker and real DuckDB files, with real consumer processes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pytest

from ingest.consumer import FeedbackIngestor
from ingest.publish import publish
from ingest.schema import encode_event
from ingest.synthetic import synthetic_events
from ktoloop.config import load_settings
from ktoloop.store import Store

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def make_config(tmp_path: Path, bootstrap: str, **ingest: object) -> Path:
    """A TOML config with a fresh topic and group, so tests sharing the broker never see each other's events."""
    name = uuid.uuid4().hex[:8]
    lines = [f'home = "{tmp_path / "home"}"', "[kafka]", f'bootstrap_servers = "{bootstrap}"',
             f'topic = "fb-{name}"', f'group_id = "g-{name}"', "connect_timeout_s = 5.0", "[ingest]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in ingest.items()]
    path = tmp_path / "ktoloop.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ktoloop.cli", "--config", str(config), *args]


def messages(events) -> list[bytes]:
    return [encode_event(e) for e in events]


def landed(settings) -> int:
    return Store(settings.db_path).scalar("SELECT count(*) FROM feedback")


MALFORMED = [
    (b"{not json", "not valid JSON"),
    (b'{"event_id": "bad-utf8", "prompt": "caf\xe9", "response": "r", "label": 1, "model_version": "m", '
     b'"event_time": 1}', "not valid UTF-8"),
    (b'{"event_id": "no-response", "prompt": "p", "label": 1, "model_version": "m", "event_time": 1}',
     "missing required field `response`"),
    (b'{"event_id": "bad-label", "prompt": "p", "response": "r", "label": "meh", "model_version": "m", '
     b'"event_time": 1}', "label 'meh'"),
    (json.dumps({"event_id": "huge", "prompt": "p" * 40_000, "response": "r", "label": 1, "model_version": "m",
                 "event_time": 1}).encode(), "length <= 32000 - at `$.prompt`"),
    (b"[1, 2, 3]", "Expected `object`, got `array`"),
]


def test_exactly_the_valid_distinct_events_land(tmp_path, broker):
    settings = load_settings(make_config(tmp_path, broker.address))
    good = list(synthetic_events(300, seed=1))
    dupes = good[:40] + good[100:110]  # producer retries / replays: same event_id again
    payload = messages(good[:150]) + [m for m, _ in MALFORMED] + messages(dupes) + messages(good[150:])
    assert publish(settings.kafka, payload) == 356

    stats = FeedbackIngestor(settings).drain()
    assert (stats.consumed, stats.landed, stats.duplicates, stats.rejected) == (356, 300, 50, 6)

    store = Store(settings.db_path)
    ids = store.read("SELECT event_id FROM feedback")["event_id"].to_list()
    assert sorted(ids) == sorted(e["event_id"] for e in good)
    dead = store.read("SELECT error, raw FROM dead_letters ORDER BY kafka_partition, kafka_offset")
    assert dead.height == 6
    for raw, reason in MALFORMED:
        rows = dead.filter(pl.col("raw") == pl.lit(raw, dtype=pl.Binary))
        assert rows.height == 1 and reason in rows["error"][0], (reason, rows)

    # a second drain finds nothing new; a full replay lands no event twice
    assert FeedbackIngestor(settings).drain().consumed == 0
    publish(settings.kafka, messages(good))
    again = FeedbackIngestor(settings).drain()
    assert (again.consumed, again.landed, again.duplicates) == (300, 0, 300)
    assert landed(settings) == 300


def test_an_edited_redelivery_and_a_huge_reject_reach_dead_letters_bounded(tmp_path, broker):
    settings = load_settings(make_config(tmp_path, broker.address, dead_letter_max_bytes=1000))
    good = list(synthetic_events(5, seed=5))
    edited = encode_event(dict(good[0], response="An edited answer."))
    huge = json.dumps({"event_id": "huge", "prompt": "p" * 300_000}).encode()  # over max_message_bytes
    assert publish(settings.kafka, messages(good) + [edited, encode_event(good[1]), huge]) == 8

    stats = FeedbackIngestor(settings).drain()
    assert (stats.consumed, stats.landed, stats.duplicates, stats.rejected) == (8, 5, 1, 2)
    dead = Store(settings.db_path).read("SELECT raw, raw_size, raw_sha256, error FROM dead_letters")
    [conflict] = dead.filter(pl.col("error").str.contains("already landed with different content")).to_dicts()
    assert conflict["raw"] == edited and f"event_id {good[0]['event_id']!r}" in conflict["error"]
    [too_big] = dead.filter(pl.col("error").str.contains("byte limit")).to_dicts()
    assert (too_big["raw"], too_big["raw_size"]) == (huge[:1000], len(huge))
    assert too_big["raw_sha256"] == hashlib.sha256(huge).hexdigest()


def test_a_drain_that_never_gets_a_partition_fails_with_exit_2(tmp_path, broker):
    config = make_config(tmp_path, broker.address, drain_join_timeout_s=0.01)  # the group join takes seconds
    settings = load_settings(config)
    publish(settings.kafka, messages(synthetic_events(10, seed=6)))
    result = subprocess.run(cli(config, "ingest", "drain"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    [line] = [x for x in result.stderr.splitlines() if "ktoloop: error:" in x]
    assert f"drain got no partition of topic {settings.kafka.topic!r}" in line and broker.address in line
    assert "Traceback" not in result.stderr


def test_kill_9_mid_stream_then_resume_lands_each_event_once(tmp_path, broker):
    config = make_config(tmp_path, broker.address, batch_max_events=300, batch_max_seconds=0.1)
    settings = load_settings(config)
    total = 30_000
    publish(settings.kafka, messages(synthetic_events(total, seed=2)))
    log = open(tmp_path / "consumer.log", "ab")
    kills = 0
    for _ in range(3):
        before = landed(settings) if settings.db_path.exists() else 0
        proc = subprocess.Popen(cli(config, "ingest", "run"), stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and landed(settings) < before + 2_000:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        now = landed(settings)
        if now < total:
            kills += 1  # killed with events still unlanded: a real mid-stream crash
        assert now > before
    assert kills >= 2
    subprocess.run(cli(config, "ingest", "drain"), check=True, stdout=log, stderr=log, timeout=120)
    store = Store(settings.db_path)
    assert store.scalar("SELECT count(*) FROM feedback") == total
    assert store.scalar("SELECT count(DISTINCT event_id) FROM feedback") == total
    assert store.scalar("SELECT count(DISTINCT (kafka_partition, kafka_offset)) FROM feedback") == total
    assert store.scalar("SELECT sum(next_offset) FROM kafka_offsets") == total


READER = """
import sys, time, json
from ktoloop.store import Store
store, stop, out = Store(sys.argv[1], lock_timeout_s=30), sys.argv[2], sys.argv[3]
reads, errors, last = 0, [], 0
import os
while not os.path.exists(stop):
    try:
        last = store.scalar("SELECT count(*) FROM feedback")
        reads += 1
    except Exception as exc:
        errors.append(repr(exc))
    time.sleep(0.01)
json.dump({"reads": reads, "errors": errors, "last": last}, open(out, "w"))
"""


def test_reader_process_reads_while_50k_events_land(tmp_path, broker):
    settings = load_settings(make_config(tmp_path, broker.address, batch_max_events=2000))
    publish(settings.kafka, messages(synthetic_events(50_000, seed=3)))
    Store(settings.db_path).init()
    stop, out = tmp_path / "stop", tmp_path / "reader.json"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(settings.db_path), str(stop), str(out)])
    try:
        stats = FeedbackIngestor(settings).drain()
    finally:
        stop.touch()
        reader.wait(timeout=60)
    report = json.loads(out.read_text())
    assert stats.landed == 50_000 and landed(settings) == 50_000
    assert report["errors"] == []
    assert report["reads"] >= 20  # it really read, interleaved with the writer's flushes


def test_sigterm_finishes_the_batch_and_exits_zero(tmp_path, broker):
    config = make_config(tmp_path, broker.address, batch_max_events=500, batch_max_seconds=0.2)
    settings = load_settings(config)
    publish(settings.kafka, messages(synthetic_events(20_000, seed=4)))
    proc = subprocess.Popen(cli(config, "ingest", "run"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not settings.db_path.exists() or landed(settings) == 0):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, output.decode()
    assert b"ingest finished" in output
    subprocess.run(cli(config, "ingest", "drain"), check=True, capture_output=True, timeout=120)
    assert landed(settings) == 20_000


def test_unreachable_broker_fails_fast_naming_the_address(tmp_path, unused_port):
    address = f"127.0.0.1:{unused_port}"
    config = make_config(tmp_path, address)
    started = time.monotonic()
    result = subprocess.run(cli(config, "ingest", "drain"), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert f"no Kafka broker reachable at {address} within 5 s" in result.stderr
    assert time.monotonic() - started < 20
    assert not load_settings(config).db_path.exists()  # no empty store left behind by a wrong address


def test_broker_cli_start_status_stop(tmp_path, unused_port):
    config = tmp_path / "broker.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[broker]\nport = {unused_port}\n')
    assert subprocess.run(cli(config, "broker", "status"), capture_output=True).returncode == 1
    started = subprocess.run(cli(config, "broker", "start"), capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        assert "running" in started.stdout and str(unused_port) in started.stdout
        assert (tmp_path / "home" / "broker.pid").is_file() and (tmp_path / "home" / "broker.log").is_file()
        status = subprocess.run(cli(config, "broker", "status"), capture_output=True, text=True)
        assert status.returncode == 0 and "running (pid" in status.stdout
    finally:
        stopped = subprocess.run(cli(config, "broker", "stop"), capture_output=True, text=True, timeout=60)
    assert stopped.stdout.strip() == "stopped"
    assert subprocess.run(cli(config, "broker", "status"), capture_output=True).returncode == 1
