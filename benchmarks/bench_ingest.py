"""Ingestion throughput, all measured in one run against the real local broker and a real DuckDB file.

  (a) raw kafka-python consume rate of the published messages (poll and count, nothing else)
  (b) full landing rate: decode, validate, dedup, write to DuckDB, commit (FeedbackIngestor.drain)
  (c) naive baseline: json.loads + one INSERT per event, autocommit, on a sample

Both (a) and (b) are timed from the first record received, so the ~3 s consumer-group join is excluded
from each. Usage: python benchmarks/bench_ingest.py [--events 200000] [--naive-sample 5000]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

import duckdb

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ingest import clients  # noqa: E402
from ingest.broker import LocalBroker  # noqa: E402
from ingest.consumer import FeedbackIngestor  # noqa: E402
from ingest.publish import publish  # noqa: E402
from ingest.schema import encode_event  # noqa: E402
from ingest.synthetic import synthetic_events  # noqa: E402
from ktoloop.config import BrokerConfig, IngestConfig, KafkaConfig, Settings  # noqa: E402
from ktoloop.migrations import MIGRATIONS  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def raw_consume(kafka: KafkaConfig, total: int, run: int) -> float:
    consumer = clients.consumer(kafka, group_id=f"{kafka.group_id}-raw-{run}")
    consumer.subscribe([kafka.topic])
    count, first = 0, None
    while count < total:
        records = consumer.poll(timeout_ms=200, max_records=5000)
        n = sum(len(batch) for batch in records.values())
        if n and first is None:
            first = time.monotonic()
        count += n
    elapsed = time.monotonic() - first
    consumer.close(autocommit=False)
    return count / elapsed


def naive_inserts(payload: list[bytes], path: Path) -> float:
    con = duckdb.connect(str(path))
    con.execute(MIGRATIONS[0][2])
    started = time.monotonic()
    for offset, value in enumerate(payload):
        e = json.loads(value)
        con.execute(
            "INSERT OR IGNORE INTO feedback VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, now())",
            [e["event_id"], e["prompt"], e["response"], e["label"] == "up", e["model_version"], e["event_time"],
             e.get("prompt_id"), None, e.get("user_id"), e.get("source"), None, "t", 0, offset],
        )
    elapsed = time.monotonic() - started
    con.close()
    return len(payload) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--naive-sample", type=int, default=5_000)
    parser.add_argument("--batch-events", type=int, default=IngestConfig().batch_max_events)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    broker = LocalBroker(BrokerConfig(port=free_port()), work)
    broker.start()
    try:
        kafka = KafkaConfig(bootstrap_servers=broker.address, topic="bench", group_id="bench")
        payload = [encode_event(e) for e in synthetic_events(args.events, seed=7)]
        mean_bytes = sum(map(len, payload)) / len(payload)
        started = time.monotonic()
        publish(kafka, payload)
        publish_rate = len(payload) / (time.monotonic() - started)

        # raw is measured before and after the landing and the faster run kept: a conservative ratio
        raw_before = raw_consume(kafka, len(payload), 1)
        settings = Settings(home=str(work / "home"), kafka=kafka,
                            ingest=IngestConfig(batch_max_events=args.batch_events))
        stats = FeedbackIngestor(settings).drain()
        assert stats.landed == len(payload), stats
        land_rate = stats.consumed / stats.busy_seconds
        raw_rate = max(raw_before, raw_consume(kafka, len(payload), 2))
        naive_rate = naive_inserts(payload[: args.naive_sample], work / "naive.duckdb")
    finally:
        broker.stop()

    rows = [
        ("publish (kafka-python producer)", publish_rate),
        ("(a) raw consume (poll + count), best of 2", raw_rate),
        ("(b) full landing (decode, validate, dedup, write, commit)", land_rate),
        (f"(c) naive: one INSERT per event (sample {args.naive_sample})", naive_rate),
    ]
    print(f"\n{args.events:,} events, mean message {mean_bytes:.0f} bytes, batches of "
          f"{settings.ingest.batch_max_events}\n")
    print(f"{'path':<62} {'events/s':>12}")
    for name, rate in rows:
        print(f"{name:<62} {rate:>12,.0f}")
    print(f"\nratio b/a (landing vs raw consume): {land_rate / raw_rate:.2f}   (goal >= 0.90)")
    print(f"ratio b/c (landing vs naive INSERTs): {land_rate / naive_rate:.1f}x")


if __name__ == "__main__":
    main()
