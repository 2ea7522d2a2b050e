"""Preference drift between a reference and a current window of landed feedback, as a structured finding.

DuckDB aggregates the rows into counts (label, prompt/response length, unseen prompts, per model version and
overall; dead letters overall). Dead letters have no event time, so the rejection test counts dead letters and
landed events alike by the time they were received, in its own (receipt-time) windows; the tests in ``monitoring.stats`` run on those counts, and ``is_drift`` says
which results are drift. The same count table and ``is_drift`` feed the Evidently report's tests, so the report
and the finding the flows act on cannot disagree.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import asdict, dataclass, field

import polars as pl

from ktoloop.errors import KtoLoopError
from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.stats import Significance, ks_test, two_proportion_test

ALL = "*"
"""Scope name of the all-model-versions aggregate."""
LENGTH_TESTS = ("prompt_length", "response_length")
"""Tests of a length distribution (Kolmogorov-Smirnov); the others compare the share of a 0/1 stat."""

_COUNTS_SQL = """
WITH windowed AS (
    SELECT CASE WHEN event_time >= $cs AND event_time < $ce THEN 'current' ELSE 'reference' END AS period,
           model_version, label, length(prompt) AS plen, length(response) AS rlen, hash(prompt) AS ph
    FROM feedback
    WHERE (event_time >= $rs AND event_time < $re) OR (event_time >= $cs AND event_time < $ce)
),
first_seen AS (
    SELECT hash(prompt) AS ph, min(event_time) AS first_time FROM feedback WHERE event_time < $ce GROUP BY 1
),
rows AS (
    SELECT windowed.*, (f.first_time >= CASE WHEN period = 'current' THEN $cs ELSE $rs END)::INT AS unseen
    FROM windowed JOIN first_seen f USING (ph)
)
SELECT period, coalesce(model_version, '*') AS scope, 'label' AS stat, label::INT AS key, count(*) AS count
FROM rows GROUP BY GROUPING SETS ((period, label), (period, model_version, label))
UNION ALL
SELECT period, coalesce(model_version, '*'), 'prompt_length', plen, count(*)
FROM rows GROUP BY GROUPING SETS ((period, plen), (period, model_version, plen))
UNION ALL
SELECT period, coalesce(model_version, '*'), 'response_length', rlen, count(*)
FROM rows GROUP BY GROUPING SETS ((period, rlen), (period, model_version, rlen))
UNION ALL
SELECT period, '*', 'unseen_prompt', unseen, count(*) FROM rows GROUP BY period, unseen
"""

_REJECTED_SQL = """
SELECT w.period, '*' AS scope, 'rejected' AS stat, w.key, w.count FROM (
    SELECT CASE WHEN received_at >= $cs AND received_at < $ce THEN 'current' ELSE 'reference' END AS period,
           1 AS key, count(*) AS count
    FROM dead_letters
    WHERE (received_at >= $rs AND received_at < $re) OR (received_at >= $cs AND received_at < $ce) GROUP BY 1
    UNION ALL
    SELECT CASE WHEN ingested_at >= $cs AND ingested_at < $ce THEN 'current' ELSE 'reference' END, 0, count(*)
    FROM feedback
    WHERE (ingested_at >= $rs AND ingested_at < $re) OR (ingested_at >= $cs AND ingested_at < $ce) GROUP BY 1
) w
"""


@dataclass(frozen=True)
class Window:
    """Half-open time range [start, end)."""

    start: dt.datetime
    end: dt.datetime

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise KtoLoopError(f"window {self} needs timezone-aware times")
        if self.end <= self.start:
            raise KtoLoopError(f"window end {self.end.isoformat()} is not after its start {self.start.isoformat()}")

    def __str__(self) -> str:
        return f"{self.start.isoformat()}/{self.end.isoformat()}"

    @classmethod
    def parse(cls, text: str, now: dt.datetime | None = None) -> Window:
        """``START/END``: ISO dates or times (UTC unless given), ``now``, or ``-7d`` / ``-12h`` before now."""
        now = now or dt.datetime.now(dt.timezone.utc)
        parts = text.split("/")
        if len(parts) != 2:
            raise KtoLoopError(f"window {text!r} must be START/END, e.g. 2025-01-01/2025-01-08 or -14d/-7d")
        return cls(*(_parse_time(p.strip(), now, text) for p in parts))


def _parse_time(text: str, now: dt.datetime, window: str) -> dt.datetime:
    if text == "now":
        return now
    if match := re.fullmatch(r"-(\d+(?:\.\d+)?)([dhm])", text):
        unit = {"d": "days", "h": "hours", "m": "minutes"}[match.group(2)]
        return now - dt.timedelta(**{unit: float(match.group(1))})
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise KtoLoopError(f"window {window!r}: cannot read {text!r} as a time (ISO, 'now' or -Nd/-Nh/-Nm)") from None
    return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)


def default_windows(store: Store, days: float) -> tuple[Window, Window]:
    """The last ``days`` before the newest event, and the ``days`` before that."""
    latest = store.scalar("SELECT max(event_time) FROM feedback")
    if latest is None:
        raise KtoLoopError(f"no feedback in {store.path}; nothing to compare (run `ktoloop ingest` first)")
    return _windows_ending(latest, days)


def default_receipt_windows(store: Store, days: float) -> tuple[Window, Window] | None:
    """The rejection test's default windows: like ``default_windows``, but ending at the newest message received
    (a backfill's events are received long after they happened). None when nothing was received."""
    latest = store.scalar("SELECT greatest((SELECT max(received_at) FROM dead_letters), "
                          "(SELECT max(ingested_at) FROM feedback))")
    return None if latest is None else _windows_ending(latest, days)


def _windows_ending(latest: dt.datetime, days: float) -> tuple[Window, Window]:
    end = latest + dt.timedelta(microseconds=1)
    span = dt.timedelta(days=days)
    return Window(end - 2 * span, end - span), Window(end - span, end)


def count_table(store: Store, reference: Window, current: Window,
                received: tuple[Window, Window] | None = None) -> pl.DataFrame:
    """Columns period (reference/current), scope, stat, key, count: everything the drift tests need, a few thousand rows at most.

    ``received``: the (reference, current) receipt-time windows of the rejection counts; default the same two."""
    ref_received, cur_received = received or (reference, current)
    params = {"rs": reference.start, "re": reference.end, "cs": current.start, "ce": current.end}
    received_params = {"rs": ref_received.start, "re": ref_received.end, "cs": cur_received.start,
                       "ce": cur_received.end}
    with store.reader() as con:
        counts = con.sql(_COUNTS_SQL, params=params).pl()
        rejected = con.sql(_REJECTED_SQL, params=received_params).pl()
    return pl.concat([counts, rejected], how="vertical_relaxed").with_columns(pl.col("count").cast(pl.Float64))


@dataclass(frozen=True)
class DriftTest:
    name: str
    """thumbs_up_rate, prompt_length, response_length, unseen_prompt_share or rejection_rate."""
    scope: str
    """A model version, or ``*`` for all of them."""
    baseline: str
    """Scope of the reference counts (a new model version is compared with all reference traffic)."""
    reference: float
    current: float
    n_reference: int
    n_current: int
    statistic: float
    p_value: float | None
    """None when a window had too few rows to test."""
    effect: float
    drifted: bool


@dataclass(frozen=True)
class DriftFinding:
    drifted: bool
    reasons: list[str]
    tests: list[DriftTest]
    reference: str
    current: str
    computed_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat())
    received_reference: str = ""
    """Receipt-time windows of the rejection test (empty: the same as ``reference`` / ``current``)."""
    received_current: str = ""

    @property
    def p_values(self) -> dict[str, float]:
        return {f"{t.name}[{t.scope}]": t.p_value for t in self.tests if t.p_value is not None}

    def to_dict(self) -> dict:
        """JSON-ready, e.g. the payload of the ``kto.drift.detected`` event; a rate of an empty window is null."""
        data = {**asdict(self), "p_values": self.p_values}
        for test in data["tests"]:
            for key in ("reference", "current", "effect"):
                if isinstance(test[key], float) and math.isnan(test[key]):
                    test[key] = None
        return data


class Counts:
    """Lookups into the count table."""

    def __init__(self, table: pl.DataFrame) -> None:
        self._hist: dict[tuple[str, str, str], dict[int, float]] = {}
        for window, scope, stat, key, count in table.iter_rows():
            if key is not None:
                self._hist.setdefault((window, scope, stat), {})[int(key)] = count

    def hist(self, window: str, scope: str, stat: str) -> dict[int, float]:
        return self._hist.get((window, scope, stat), {})

    def total(self, window: str, scope: str, stat: str) -> float:
        return sum(self.hist(window, scope, stat).values())

    def share(self, window: str, scope: str, stat: str) -> tuple[float, float]:
        """(count of key 1, total)."""
        hist = self.hist(window, scope, stat)
        return hist.get(1, 0.0), sum(hist.values())

    def scopes(self, window: str) -> list[str]:
        return sorted({s for (w, s, stat) in self._hist if w == window and stat == "label"})


def is_drift(name: str, sig: Significance, current: float, config: MonitorConfig) -> bool:
    """The drift rule of test ``name``, the only copy: the finding and the Evidently report's tests both call it.

    Significant is not enough: at 2,000,000 rows a window, thumbs-up 0.500 -> 0.505 has p ~ 1e-23, so a change
    must also be large enough to act on. ``current``: the current window's share (the unseen-prompt rule).
    """
    significant = sig.p_value < config.alpha
    if name == "thumbs_up_rate":
        return significant and abs(sig.effect) >= config.min_rate_change
    if name in LENGTH_TESTS:
        return significant and sig.effect >= config.min_ks_distance
    if name == "rejection_rate":  # any significant rise: malformed messages are an ingest fault, not a trend
        return significant and sig.effect > 0
    if name == "unseen_prompt_share":  # new prompts are normal; only too large a share of them is flagged
        return current > config.max_unseen_prompt_share
    raise KtoLoopError(f"no drift rule for test {name!r}")


def _rate(hits: float, n: float) -> float:
    return hits / n if n else float("nan")


def _mean(hist: dict[int, float]) -> float:
    n = sum(hist.values())
    return sum(k * c for k, c in hist.items()) / n if n else float("nan")


def _proportion(counts: Counts, name: str, stat: str, scope: str, baseline: str, min_rows: int,
                config: MonitorConfig) -> DriftTest:
    ref_hits, ref_n = counts.share("reference", baseline, stat)
    cur_hits, cur_n = counts.share("current", scope, stat)
    tested = ref_n >= min_rows and cur_n >= min_rows
    sig = two_proportion_test(ref_hits, ref_n, cur_hits, cur_n) if tested else Significance(0.0, 1.0, 0.0)
    current = _rate(cur_hits, cur_n)
    return DriftTest(name, scope, baseline, _rate(ref_hits, ref_n), current, int(ref_n), int(cur_n),
                     sig.statistic, sig.p_value if tested else None, current - _rate(ref_hits, ref_n),
                     tested and is_drift(name, sig, current, config))


def _distribution(counts: Counts, name: str, stat: str, scope: str, baseline: str, config: MonitorConfig) -> DriftTest:
    ref, cur = counts.hist("reference", baseline, stat), counts.hist("current", scope, stat)
    ref_n, cur_n = sum(ref.values()), sum(cur.values())
    tested = ref_n >= config.min_rows and cur_n >= config.min_rows
    sig = ks_test(ref, cur) if tested else Significance(0.0, 1.0, 0.0)
    return DriftTest(name, scope, baseline, _mean(ref), _mean(cur), int(ref_n), int(cur_n),
                     sig.statistic, sig.p_value if tested else None, sig.effect,
                     tested and is_drift(name, sig, _mean(cur), config))


def find_drift(counts_table: pl.DataFrame, reference: Window, current: Window,
               config: MonitorConfig | None = None, received: tuple[Window, Window] | None = None) -> DriftFinding:
    """Run every test on a count table (see ``count_table``; ``received``: its rejection counts' windows)."""
    config = config or MonitorConfig()
    counts = Counts(counts_table)
    tests: list[DriftTest] = []
    for scope in counts.scopes("current"):
        # a version without enough reference traffic of its own (a new model) is compared with all of it
        own = counts.total("reference", scope, "label") >= config.min_rows
        baseline = scope if own else ALL
        tests.append(_proportion(counts, "thumbs_up_rate", "label", scope, baseline, config.min_rows, config))
        tests.append(_distribution(counts, "prompt_length", "prompt_length", scope, baseline, config))
        tests.append(_distribution(counts, "response_length", "response_length", scope, baseline, config))
    tests.append(_proportion(counts, "unseen_prompt_share", "unseen_prompt", ALL, ALL, 1, config))
    tests.append(_proportion(counts, "rejection_rate", "rejected", ALL, ALL, config.min_rows, config))
    reasons = [_reason(t) for t in tests if t.drifted]
    ref_received, cur_received = received or (reference, current)
    return DriftFinding(bool(reasons), reasons, tests, str(reference), str(current),
                        received_reference=str(ref_received), received_current=str(cur_received))


def _reason(t: DriftTest) -> str:
    where = "all model versions" if t.scope == ALL else f"model version {t.scope}"
    vs = "" if t.baseline == t.scope else " (vs all reference traffic)"
    p = "" if t.p_value is None else f", p={t.p_value:.2g}"
    return f"{t.name} on {where}: {t.reference:.4g} -> {t.current:.4g}{vs} (n={t.n_reference}/{t.n_current}{p})"


def drift_finding(store: Store, reference: Window, current: Window, config: MonitorConfig | None = None,
                  received: tuple[Window, Window] | None = None) -> tuple[DriftFinding, pl.DataFrame]:
    """Aggregate the windows in DuckDB and test them; returns the finding and the count table behind it."""
    table = count_table(store, reference, current, received)
    return find_drift(table, reference, current, config, received), table
