"""Synthetic landed feedback with known rates and lengths, for drift tests, the benchmark and demos.

Rows land through the consumer's own writer (``ingest.landing.land``, no Kafka), as one batch received when
its window ends, so a million rows land in seconds and the table holds what ingestion would have written.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import polars as pl

from ingest.landing import Batch, land
from ingest.schema import FeedbackEvent
from ktoloop.store import Store

GROUP = "synthetic"
"""The consumer group synthetic batches land under (they record no Kafka offsets)."""


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


def insert_feedback(store: Store, frame: pl.DataFrame, topic: str = "feedback",
                    received_at: dt.datetime | None = None) -> None:
    """Land ``frame``'s rows: as one batch received at ``received_at``, or by default one batch per UTC day
    of event time, received at that day's newest event (so the receipt clock follows the event clock)."""
    if received_at is not None:
        _land(store, frame, topic, received_at)
        return
    days = frame.with_columns(day=pl.col("event_time").dt.truncate("1d"))
    for day in days.partition_by("day", include_key=False, maintain_order=True):
        _land(store, day, topic, day["event_time"].max())


def _land(store: Store, frame: pl.DataFrame, topic: str, received_at: dt.datetime) -> None:
    events = [FeedbackEvent(event_id=r["event_id"], prompt=r["prompt"], response=r["response"], label=r["label"],
                            model_version=r["model_version"], event_time=r["event_time"])
              for r in frame.select("event_id", "prompt", "response", "label", "model_version", "event_time")
                            .iter_rows(named=True)]
    positions = [(topic, p, o) for p, o in zip(frame["kafka_partition"], frame["kafka_offset"], strict=True)]
    land(store, GROUP, Batch(events=events, positions=positions), received_at=received_at)


def insert_dead_letters(store: Store, times: list[dt.datetime], topic: str = "feedback") -> None:
    """One rejected message received at each of ``times``."""
    for i, t in enumerate(times):
        land(store, GROUP, Batch(rejects=[(topic, 0, 10**9 + i, None, "synthetic rejection")]), received_at=t)
