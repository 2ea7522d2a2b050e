"""Synthetic landed feedback with known rates and lengths, for drift tests, the benchmark and demos.

Rows go straight into the ``feedback`` table through the Store (no Kafka), built as one Arrow batch so a
million rows land in seconds.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from ktoloop.store import Store


def feedback_frame(n: int, start: dt.datetime, end: dt.datetime, *, up_rate: float, model_version: str = "v1",
                   prompt_chars: int = 80, response_chars: int = 300, prompt_pool: int = 1000,
                   prompt_prefix: str = "prompt", seed: int = 0) -> pl.DataFrame:
    """``n`` events spread over [start, end) with exactly ``round(n * up_rate)`` thumbs up, in random order."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(n, dtype=bool)
    labels[: round(n * up_rate)] = True
    rng.shuffle(labels)
    span_us = int((end - start).total_seconds() * 1e6)
    offsets = pl.Series(np.sort(rng.integers(0, span_us, n)), dtype=pl.Int64).cast(pl.Duration("us"))
    times = pl.lit(start).cast(pl.Datetime("us", "UTC")) + offsets
    prompt_ids = rng.integers(0, prompt_pool, n)
    # each prompt of the pool has a fixed text, so windows drawn from the same pool share prompts
    pool_lengths = np.maximum(1, np.random.default_rng(prompt_pool).poisson(prompt_chars, prompt_pool))
    plens = pool_lengths[prompt_ids]
    rlens = np.maximum(1, rng.poisson(response_chars, n))
    prompts = [f"{prompt_prefix} {p} ".ljust(int(length), "x") for p, length in zip(prompt_ids, plens, strict=True)]
    base = f"{seed}-{rng.bytes(6).hex()}"
    return pl.DataFrame({
        "event_id": [f"{base}-{i}" for i in range(n)],
        "prompt": prompts,
        "response": ["r" * int(length) for length in rlens],
        "label": labels,
        "model_version": [model_version] * n,
        "kafka_partition": np.zeros(n, dtype=np.int32),
        "kafka_offset": np.arange(n, dtype=np.int64),
    }).with_columns(event_time=times).select(["event_id", "prompt", "response", "label", "model_version", "event_time",
                                              "kafka_partition", "kafka_offset"])


def insert_feedback(store: Store, frame: pl.DataFrame, topic: str = "feedback") -> None:
    """Land rows as ingestion would (ingested_at = event_time); missing optional columns stay NULL."""
    with store.writer() as con:
        con.register("incoming", frame.to_arrow())
        con.execute(
            "INSERT INTO feedback (event_id, prompt, response, label, model_version, event_time, kafka_topic, "
            "kafka_partition, kafka_offset, ingested_at) "
            "SELECT event_id, prompt, response, label, model_version, event_time, ?, kafka_partition, "
            "kafka_offset, event_time FROM incoming", [topic])
        con.unregister("incoming")


def insert_dead_letters(store: Store, times: list[dt.datetime], topic: str = "feedback") -> None:
    with store.writer() as con:
        con.executemany("INSERT INTO dead_letters (kafka_topic, kafka_partition, kafka_offset, raw, error, "
                        "received_at) VALUES (?, 0, ?, NULL, 'synthetic rejection', ?)",
                        [(topic, 10**9 + i, t) for i, t in enumerate(times)])
