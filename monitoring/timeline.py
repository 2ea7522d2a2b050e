"""The dashboard's time axis: landed feedback counted per event-time bucket, messages per receipt-time bucket.

Each bucket becomes one Evidently snapshot stamped with the bucket's start, so a backfill fills the dashboard
with one point per bucket, not one per monitor run. Dead letters have no event time, so the rejected share
counts dead letters and landed events alike by the time they were received. A bucket that overlaps a window of
the latest drift report also carries that whole window's thumbs-up rate, drawn as a flat line over the window.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass

import polars as pl

from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.drift import ALL, Window

EVENT, RECEIPT = "event", "receipt"
"""The two clocks: when feedback happened, and when a message (landed or dead) was received."""
WINDOW_SCOPES = {"reference": "reference window", "current": "current window"}
"""Scope of the rows holding a whole window's counts inside a bucket (``FeedbackShare(scope=...)``)."""
_VERSION = 1  # bump when a bucket snapshot's metrics change, so every bucket is rebuilt once

_EVENT_SQL = """
WITH b AS (SELECT epoch_us(event_time) // $w AS bucket, model_version, label FROM feedback),
newest AS (SELECT max(bucket) AS m FROM b)
SELECT bucket, coalesce(model_version, '*') AS scope, 'label' AS stat, label::INT AS key, count(*)::DOUBLE AS count
FROM b, newest WHERE bucket > m - $n
GROUP BY GROUPING SETS ((bucket, label), (bucket, model_version, label))
"""
_RECEIPT_SQL = """
WITH msgs AS (SELECT epoch_us(received_at) // $w AS bucket, 1 AS key FROM dead_letters
              UNION ALL SELECT epoch_us(ingested_at) // $w, 0 FROM feedback),
newest AS (SELECT max(bucket) AS m FROM msgs)
SELECT bucket, '*' AS scope, 'rejected' AS stat, key, count(*)::DOUBLE AS count
FROM msgs, newest WHERE bucket > m - $n GROUP BY bucket, key
"""


def tag(clock: str, config: MonitorConfig) -> str:
    """The tag the dashboard's panels select a clock's bucket snapshots by (it names the bucket size)."""
    return f"per {bucket_words(config)} ({clock} time)"


def bucket_words(config: MonitorConfig) -> str:
    hours = config.bucket_hours
    if hours == 24:
        return "day"
    return f"{hours:g} h" if hours >= 1 else f"{hours * 60:g} min"


@dataclass(frozen=True)
class Bucket:
    clock: str
    start: dt.datetime
    rows: tuple[tuple[str, str, int, float], ...]
    """(scope, stat, key, count), the whole windows' rows included."""
    windows: tuple[str, ...]
    """Which windows of the latest report overlap this bucket ("reference window", "current window")."""

    @property
    def key(self) -> str:
        return f"{self.clock}:{self.start.isoformat()}"

    @property
    def digest(self) -> str:
        """Changes exactly when the snapshot would: a bucket whose digest is logged already is skipped."""
        payload = json.dumps([_VERSION, self.clock, self.start.isoformat(), self.rows, self.windows])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def snapshot(self, config: MonitorConfig):
        from evidently import Report

        from monitoring.evidently_metrics import EventCount, FeedbackShare, count_dataset

        if self.clock == EVENT:
            scopes = sorted({s for s, *_ in self.rows if s not in WINDOW_SCOPES.values()}, key=lambda s: s != ALL)
            metrics = [m for s in scopes for m in (FeedbackShare(stat="label", scope=s), EventCount(stat="label", scope=s))]
            metrics += [FeedbackShare(stat="label", scope=w) for w in self.windows]
        else:
            metrics = [FeedbackShare(stat="rejected"), EventCount(stat="rejected", key="1"), EventCount(stat="rejected")]
        frame = pl.DataFrame(list(self.rows), schema={"scope": pl.Utf8, "stat": pl.Utf8, "key": pl.Int64,
                                                      "count": pl.Float64}, orient="row").to_pandas()
        report = Report(metrics, metadata={"kind": "bucket", "clock": self.clock, "start": self.start.isoformat(),
                                           "digest": self.digest}, tags=[tag(self.clock, config), *self.windows])
        return report.run(count_dataset(frame), None, timestamp=self.start.replace(tzinfo=None),
                          name=f"{'feedback' if self.clock == EVENT else 'messages received'} "
                               f"{self.start:%Y-%m-%d %H:%M} UTC ({self.clock} time)")


def buckets(store: Store, counts: pl.DataFrame, reference: Window, current: Window,
            config: MonitorConfig) -> list[Bucket]:
    """The newest ``dashboard_buckets`` buckets of each clock; ``counts`` is the report's count table, whose
    whole-window thumbs-up counts go into the event buckets that overlap each window."""
    width = round(config.bucket_hours * 3600e6)
    params = {"w": width, "n": config.dashboard_buckets}
    with store.reader() as con:
        tables = {EVENT: con.sql(_EVENT_SQL, params=params).pl(), RECEIPT: con.sql(_RECEIPT_SQL, params=params).pl()}
    whole = {period: tuple((WINDOW_SCOPES[period], "label", int(k), float(c)) for k, c in
                           counts.filter((pl.col("period") == period) & (pl.col("scope") == ALL) &
                                         (pl.col("stat") == "label")).select("key", "count").sort("key").iter_rows())
             for period in WINDOW_SCOPES}
    step = dt.timedelta(microseconds=width)
    out = []
    for clock, table in tables.items():
        for (index,), group in sorted(table.group_by("bucket"), key=lambda g: g[0][0]):
            start = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc) + index * step
            rows = tuple(sorted(group.select("scope", "stat", "key", "count").iter_rows()))
            windows: tuple[str, ...] = ()
            if clock == EVENT:
                overlapping = [p for p, w in (("reference", reference), ("current", current))
                               if start < w.end and start + step > w.start and whole[p]]
                windows = tuple(WINDOW_SCOPES[p] for p in overlapping)
                rows += tuple(r for p in overlapping for r in whole[p])
            out.append(Bucket(clock, start, rows, windows))
    return out
