"""Landing batches in a real DuckDB file: what a redelivery and a huge reject leave behind."""

from __future__ import annotations

import hashlib
import json

import duckdb
import pytest

from ingest.landing import Batch, land
from ingest.schema import EventDecoder, encode_event
from ingest.synthetic import synthetic_events
from ktoloop.migrations import MIGRATIONS
from ktoloop.store import Store

DECODER = EventDecoder()


def batch(messages: list[bytes], partition: int, rejects=()) -> Batch:
    """Messages as the consumer would have read them from ``partition``, offsets 0, 1, ..."""
    return Batch(events=[DECODER.decode(m) for m in messages],
                 positions=[("fb", partition, offset) for offset in range(len(messages))],
                 payloads=list(messages), rejects=list(rejects),
                 next_offsets={("fb", partition): len(messages)} if messages else {})


def dead_letters(store: Store) -> list[dict]:
    return store.read("SELECT * FROM dead_letters ORDER BY kafka_partition, kafka_offset").to_dicts()


def test_redelivery_with_other_content_is_quarantined_naming_both_versions(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    first = [dict(e, metadata={"lang": "fr", "note": "café"}) for e in synthetic_events(3, seed=1)]
    assert land(store, "g", batch([encode_event(e) for e in first], 0)).landed == 3

    edited = encode_event(dict(first[1], response="A different answer.", label="down"))
    same_again = json.dumps(dict(first[0], label=first[0]["label"] == "up")).encode()  # other bytes, same event
    result = land(store, "g", batch([same_again, edited], 1))

    assert (result.landed, result.duplicates, result.rejected) == (0, 1, 1)
    [dead] = dead_letters(store)
    assert (dead["kafka_partition"], dead["kafka_offset"], dead["raw"]) == (1, 1, edited)
    landed_hash, new_hash = dead["error"].split("content sha256 ")[1:]
    assert landed_hash[:16] != new_hash[:16]
    assert dead["error"].startswith(f"event_id {first[1]['event_id']!r} already landed with different content "
                                    "(landed from fb[0]@1")
    assert "differing: response, label)" in dead["error"] and "new event_id" in dead["error"]
    kept = store.read("SELECT response, kafka_partition FROM feedback WHERE event_id = ?", [first[1]["event_id"]])
    assert kept.rows() == [(first[1]["response"], 0)]  # the landed version stays


def test_the_cut_off_flag_lands_and_is_part_of_the_event(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    [event] = synthetic_events(1, seed=5)
    assert land(store, "g", batch([encode_event(dict(event, truncated=True))], 0)).landed == 1
    assert store.read("SELECT truncated FROM feedback").rows() == [(True,)]
    assert land(store, "g", batch([encode_event(dict(event, truncated=False))], 1)).rejected == 1
    assert "differing: truncated)" in dead_letters(store)[0]["error"]


def test_two_versions_of_one_event_id_in_one_batch_land_the_first_and_quarantine_the_second(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    [event] = synthetic_events(1, seed=2)
    versions = [encode_event(event), encode_event(event), encode_event(dict(event, prompt="Another prompt?"))]
    result = land(store, "g", batch(versions, 0))
    assert (result.landed, result.duplicates, result.rejected) == (1, 1, 1)
    [dead] = dead_letters(store)
    assert dead["kafka_offset"] == 2 and dead["raw"] == versions[2]
    assert "already landed with different content (landed from fb[0]@0" in dead["error"]
    assert "differing: prompt)" in dead["error"]
    assert store.scalar("SELECT prompt FROM feedback") == event["prompt"]


def test_a_rejected_10_mb_message_keeps_a_prefix_its_size_and_sha256(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    huge = b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    rejects = [("fb", 0, 0, huge, "message is too big"), ("fb", 0, 1, None, "empty message (null value)"),
               ("fb", 0, 2, b"{oops", "not valid JSON")]
    assert land(store, "g", batch([], 0, rejects)).rejected == 3
    big, null, small = dead_letters(store)
    assert big["raw"] == huge[:65_536] and big["raw_size"] == len(huge)
    assert big["raw_sha256"] == hashlib.sha256(huge).hexdigest()
    assert (null["raw"], null["raw_size"], null["raw_sha256"]) == (None, None, None)
    assert (small["raw"], small["raw_size"]) == (b"{oops", 5)

    land(store, "g", Batch(rejects=[("fb", 1, 0, huge, "too big")]), dead_letter_max_bytes=10)
    assert store.scalar("SELECT raw FROM dead_letters WHERE kafka_partition = 1") == huge[:10]


def test_a_file_from_before_the_dead_letter_columns_upgrades_with_them_backfilled(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, name VARCHAR, "
                "applied_at TIMESTAMPTZ DEFAULT current_timestamp)")
    for version, name, sql in MIGRATIONS:
        if version <= 4:
            con.execute(sql)
            con.execute("INSERT INTO schema_version (version, name) VALUES (?, ?)", [version, name])
    con.execute("INSERT INTO dead_letters VALUES ('fb', 0, 7, '{oops'::BLOB, 'not valid JSON', now()), "
                "('fb', 0, 8, NULL, 'empty message (null value)', now())")
    con.close()

    store = Store(path)
    store.init()
    rows = store.read("SELECT kafka_offset, raw_size, raw_sha256 FROM dead_letters ORDER BY 1").rows()
    assert rows == [(7, 5, hashlib.sha256(b"{oops").hexdigest()), (8, None, None)]
    assert 101 in store.read("SELECT version FROM schema_version")["version"].to_list()
    [message] = [encode_event(e) for e in synthetic_events(1, seed=3)]
    assert land(store, "g", batch([message], 0, [("fb", 0, 9, b"x", "bad")])).landed == 1


@pytest.mark.parametrize("metadata", [None, {"k": [1, "ü"], "nested": {"a": None}}])
def test_an_exact_redelivery_is_a_silent_duplicate(tmp_path, metadata):
    store = Store(tmp_path / "k.duckdb")
    [event] = synthetic_events(1, seed=4)
    message = encode_event(dict(event, metadata=metadata))
    assert land(store, "g", batch([message], 0)).landed == 1
    result = land(store, "g", batch([message, message], 1))
    assert (result.landed, result.duplicates, result.rejected) == (0, 2, 0)
    assert dead_letters(store) == []
