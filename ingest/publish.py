"""Publish feedback events from a JSONL (optionally .gz) or Parquet file to the topic: backfills and demos.

Lines are sent unchanged (validation is the consumer's job, so a bad line still reaches dead_letters
with its reason); the event_id, when readable, becomes the message key.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import msgspec
import polars as pl

from ingest import clients
from ingest.schema import encode_event
from ktoloop.config import KafkaConfig
from ktoloop.errors import KtoLoopError

log = logging.getLogger(__name__)


def read_messages(path: str | Path) -> Iterator[bytes]:
    """Raw message values from a .jsonl / .jsonl.gz (one per non-empty line) or a .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise KtoLoopError(f"input file not found: {path}")
    if path.suffix == ".parquet":
        for row in pl.read_parquet(path).iter_rows(named=True):
            yield encode_event({k: v for k, v in row.items() if v is not None})
        return
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line in handle:
            line = line.rstrip(b"\r\n")
            if line.strip():
                yield line


def _key(value: bytes) -> bytes | None:
    try:
        event_id = msgspec.json.decode(value).get("event_id")
    except (msgspec.DecodeError, AttributeError, UnicodeDecodeError):
        return None
    return str(event_id).encode() if event_id is not None else None


def publish(config: KafkaConfig, messages: Iterable[bytes]) -> int:
    """Send every message to ``config.topic``; returns the count once all are acknowledged."""
    clients.ensure_topic(config)
    producer = clients.producer(config)
    sent = 0
    started = time.monotonic()
    try:
        for value in messages:
            producer.send(config.topic, key=_key(value), value=value)
            sent += 1
            if sent % 50_000 == 0:
                log.info("published %d messages (%.0f msg/s)", sent, sent / (time.monotonic() - started))
        producer.flush()
    finally:
        producer.close()
    log.info("published %d messages to %s in %.1f s", sent, config.topic, time.monotonic() - started)
    return sent
