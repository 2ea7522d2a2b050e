"""Preference drift on feedback landed through the Store (no Kafka): what it catches and when it stays quiet."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from ktoloop.errors import KtoLoopError
from ktoloop.store import Store
from monitoring.drift import ALL, Window, default_receipt_windows, default_windows, drift_finding
from monitoring.stats import ks_test, two_proportion_test
from monitoring.synthetic import feedback_frame, insert_dead_letters, insert_feedback

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
WEEK = dt.timedelta(days=7)
REFERENCE, CURRENT = Window(T0, T0 + WEEK), Window(T0 + WEEK, T0 + 2 * WEEK)


def landed(tmp_path, current_rate: float, **current) -> Store:
    store = Store(tmp_path / "k.duckdb")
    insert_feedback(store, feedback_frame(5000, REFERENCE.start, REFERENCE.end, up_rate=0.70, seed=1))
    insert_feedback(store, feedback_frame(5000, CURRENT.start, CURRENT.end, up_rate=current_rate, seed=2, **current))
    return store


def find(finding, name, scope=ALL):
    return next(t for t in finding.tests if t.name == name and t.scope == scope)


def test_catches_70_to_62_drop_on_5k_rows(tmp_path):
    finding, _ = drift_finding(landed(tmp_path, 0.62), REFERENCE, CURRENT)
    rate = find(finding, "thumbs_up_rate")
    assert finding.drifted and rate.drifted
    assert rate.reference == pytest.approx(0.70) and rate.current == pytest.approx(0.62)
    assert rate.p_value < 1e-10
    assert any(r.startswith("thumbs_up_rate on all model versions") for r in finding.reasons)
    assert find(finding, "thumbs_up_rate", "v1").drifted  # per model version too
    assert finding.to_dict()["p_values"]["thumbs_up_rate[*]"] == rate.p_value


def test_quiet_on_equal_rates(tmp_path):
    finding, _ = drift_finding(landed(tmp_path, 0.70), REFERENCE, CURRENT)
    assert not finding.drifted, finding.reasons
    assert find(finding, "thumbs_up_rate").p_value > 0.5


def test_new_model_version_compared_with_all_reference_traffic(tmp_path):
    store = landed(tmp_path, 0.70)
    insert_feedback(store, feedback_frame(800, CURRENT.start, CURRENT.end, up_rate=0.55, model_version="v2",
                                          response_chars=420, seed=5))
    finding, _ = drift_finding(store, REFERENCE, CURRENT)
    rate, length = find(finding, "thumbs_up_rate", "v2"), find(finding, "response_length", "v2")
    assert rate.baseline == ALL and rate.drifted
    assert length.drifted and length.current > length.reference
    assert not find(finding, "thumbs_up_rate", "v1").drifted


def test_length_shift_and_rejections(tmp_path):
    store = landed(tmp_path, 0.70, prompt_chars=140)
    insert_dead_letters(store, [CURRENT.start + dt.timedelta(hours=h) for h in range(150)])
    finding, _ = drift_finding(store, REFERENCE, CURRENT)
    assert find(finding, "prompt_length").drifted
    assert not find(finding, "response_length").drifted
    rejection = find(finding, "rejection_rate")
    assert rejection.drifted and rejection.current == pytest.approx(150 / 5150)
    assert not find(finding, "thumbs_up_rate").drifted


def test_a_backfills_rejections_are_counted_when_they_were_received(tmp_path):
    """Events of March all received in April: dead letters have no event time, so the rejection test's default
    windows end at the newest message received. Event-time windows hold no receipt at all (a NaN share before)."""
    store = landed(tmp_path, 0.70)
    received = T0 + 6 * WEEK
    with store.writer() as con:
        con.execute("UPDATE feedback SET ingested_at = ?", [received])
    insert_dead_letters(store, [received + dt.timedelta(minutes=m) for m in range(30)])
    reference, current = default_windows(store, 7)
    finding, _ = drift_finding(store, reference, current, received=default_receipt_windows(store, 7))
    rejection = find(finding, "rejection_rate")
    assert rejection.n_current == 10_030 and rejection.current == pytest.approx(30 / 10_030)
    assert rejection.n_reference == 0 and rejection.p_value is None  # nothing was received the week before
    assert finding.received_current.startswith((received - WEEK).date().isoformat())
    json.dumps(finding.to_dict(), allow_nan=False)  # valid JSON: the empty window's share is null, not NaN
    event_clock, _ = drift_finding(store, reference, current)
    assert find(event_clock, "rejection_rate").n_current == 0


def test_unseen_prompt_share(tmp_path):
    store = landed(tmp_path, 0.70, prompt_prefix="brand new question")
    finding, _ = drift_finding(store, REFERENCE, CURRENT)
    assert find(finding, "unseen_prompt_share").current == pytest.approx(1.0)
    store2 = landed(tmp_path / "b", 0.70)
    same, _ = drift_finding(store2, REFERENCE, CURRENT)
    assert find(same, "unseen_prompt_share").current < 0.05  # the same 1000-prompt pool


def test_small_windows_are_reported_not_tested(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    insert_feedback(store, feedback_frame(50, REFERENCE.start, REFERENCE.end, up_rate=0.9, seed=1))
    insert_feedback(store, feedback_frame(50, CURRENT.start, CURRENT.end, up_rate=0.1, seed=2))
    finding, _ = drift_finding(store, REFERENCE, CURRENT)
    assert not finding.drifted
    assert find(finding, "thumbs_up_rate").p_value is None


def test_default_windows_end_at_the_newest_event(tmp_path):
    store = landed(tmp_path, 0.70)
    reference, current = default_windows(store, 7)
    assert current.end > T0 + 2 * WEEK - dt.timedelta(hours=1)
    assert reference.end == current.start
    with pytest.raises(KtoLoopError, match="no feedback"):
        default_windows(Store(tmp_path / "empty.duckdb"), 7)


def test_window_parsing():
    now = dt.datetime(2025, 1, 15, tzinfo=dt.timezone.utc)
    assert Window.parse("-14d/-7d", now) == Window(now - 2 * WEEK, now - WEEK)
    assert Window.parse("2025-01-01/2025-01-08").start == dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    with pytest.raises(KtoLoopError, match="START/END"):
        Window.parse("2025-01-01")
    with pytest.raises(KtoLoopError, match="not after"):
        Window.parse("-7d/-14d", now)


def test_statistics_on_counts():
    assert two_proportion_test(3500, 5000, 3100, 5000).p_value < 1e-10
    assert two_proportion_test(3500, 5000, 3500, 5000).p_value == pytest.approx(1.0)
    same = {10: 100, 20: 200, 30: 100}
    assert ks_test(same, same).p_value == pytest.approx(1.0)
    shifted = ks_test({10: 500, 20: 500}, {20: 500, 30: 500})
    assert shifted.effect == pytest.approx(0.5) and shifted.p_value < 1e-10


@pytest.mark.slow
def test_evidently_default_categorical_drift_misses_what_ours_catches(tmp_path):
    """Why the custom test exists: ValueDrift's default (Jensen-Shannon, threshold 0.1) calls 70 % -> 62 % stable."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    store = landed(tmp_path, 0.62)
    labels = {w.start: store.read("SELECT label::INT::VARCHAR AS label FROM feedback WHERE event_time >= ? AND "
                                  "event_time < ?", [w.start, w.end]).to_pandas() for w in (REFERENCE, CURRENT)}
    definition = DataDefinition(categorical_columns=["label"])
    snapshot = Report([ValueDrift(column="label")]).run(Dataset.from_pandas(labels[CURRENT.start], definition),
                                                        Dataset.from_pandas(labels[REFERENCE.start], definition))
    metric = snapshot.dict()["metrics"][0]
    assert metric["config"]["method"] == "Jensen-Shannon distance"
    assert metric["value"] < metric["config"]["threshold"]  # Evidently: no drift
    finding, _ = drift_finding(store, REFERENCE, CURRENT)
    assert find(finding, "thumbs_up_rate").drifted  # ours: drift
