"""Evidently reports: drift (from the count table) and capability scores (from an evaluation run).

``drift_report`` is what ``ktoloop monitor report`` and the monitoring flow call: it aggregates, tests,
writes HTML + JSON (Evidently's report and our finding), and logs the run and the per-bucket timeline to the
local workspace. ``log_evaluation`` is what ``ktoloop evaluate`` and the retrain flow call for a capability run.
"""

from __future__ import annotations

import datetime as dt
import html as html_lib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.drift import (
    ALL,
    DriftFinding,
    DriftTest,
    Window,
    default_receipt_windows,
    default_windows,
    drift_finding,
)


@dataclass(frozen=True)
class DriftReport:
    finding: DriftFinding
    html: Path
    json: Path
    finding_json: Path
    snapshot_id: str | None
    """The run's id in the Evidently workspace (None when no workspace was given)."""


def _drift_metrics(finding: DriftFinding, config: MonitorConfig) -> list:
    """Shares and p-values for the panels; the tests are on ``DriftDetected`` (the finding's rule), one per
    tested finding test, so the report passes exactly when the finding has no drift."""
    from evidently.tests import eq

    from monitoring.evidently_metrics import DistributionDriftPValue, DriftDetected, FeedbackShare, ShareDriftPValue

    by_type = {"thumbs_up_rate": ("label", ShareDriftPValue), "rejection_rate": ("rejected", ShareDriftPValue),
               "unseen_prompt_share": ("unseen_prompt", ShareDriftPValue),
               "prompt_length": ("prompt_length", DistributionDriftPValue),
               "response_length": ("response_length", DistributionDriftPValue)}
    metrics = []
    for test in finding.tests:
        stat, metric_type = by_type[test.name]
        if metric_type is ShareDriftPValue and test.n_current:  # an empty window has no share (not NaN)
            metrics.append(FeedbackShare(stat=stat, scope=test.scope))
        if test.p_value is None:
            continue  # too few rows: reported, not tested
        if test.name != "unseen_prompt_share":
            metrics.append(metric_type(stat=stat, scope=test.scope, baseline=test.baseline))
        metrics.append(DriftDetected(test=test.name, stat=stat, scope=test.scope, baseline=test.baseline,
                                     alpha=config.alpha, min_rate_change=config.min_rate_change,
                                     min_ks_distance=config.min_ks_distance,
                                     max_unseen_prompt_share=config.max_unseen_prompt_share, tests=[eq(0)]))
    return metrics


def build_drift_snapshot(table: pl.DataFrame, finding: DriftFinding, current: Window, config: MonitorConfig):
    """An Evidently snapshot whose metrics recompute the finding's numbers from the count table."""
    from evidently import Report

    from monitoring.evidently_metrics import count_dataset

    frame = table.to_pandas()
    datasets = {p: count_dataset(frame[frame["period"] == p].drop(columns="period").reset_index(drop=True))
                for p in ("reference", "current")}
    report = Report(_drift_metrics(finding, config), metadata={"kind": "drift", "drifted": str(finding.drifted)},
                    tags=["drift"])
    return report.run(datasets["current"], datasets["reference"], timestamp=_naive_utc(current.end),
                      name=f"drift {finding.current}")


def drift_report(store: Store, out_dir: Path, *, reference: Window | None = None, current: Window | None = None,
                 config: MonitorConfig | None = None, workspace: Path | None = None) -> DriftReport:
    """Compare two windows of landed feedback; write reports under ``out_dir`` and log to ``workspace``.

    With no windows given, the event-time windows end at the newest event and the rejection test's
    receipt-time windows at the newest message received; given windows serve both clocks."""
    config = config or MonitorConfig()
    received = None
    if reference is None or current is None:
        default_ref, default_cur = default_windows(store, config.window_days)
        reference, current = reference or default_ref, current or default_cur
        received = default_receipt_windows(store, config.window_days)
    finding, table = drift_finding(store, reference, current, config, received)
    snapshot = build_drift_snapshot(table, finding, current, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"drift-{current.end.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S}"
    html, report_json, finding_json = out_dir / f"{stem}.html", out_dir / f"{stem}.json", out_dir / f"{stem}.finding.json"
    snapshot.save_html(str(html))
    _add_header(html, finding, config)
    snapshot.save_json(str(report_json))
    finding_json.write_text(json.dumps(finding.to_dict(), indent=2, default=str))
    snapshot_id = None
    if workspace is not None:
        from monitoring.timeline import buckets
        from monitoring.workspace import log_buckets, log_run, stable_id

        title, lines = verdict_words(finding)
        snapshot_id = log_run(workspace, snapshot, stable_id("drift", finding.reference, finding.current,
                                                             finding.received_reference, finding.received_current),
                              config, verdict=(title, " · ".join(lines)))
        log_buckets(workspace, buckets(store, table, reference, current, config), config)
    return DriftReport(finding, html, report_json, finding_json, snapshot_id)


_TEST_WORDS = {"thumbs_up_rate": "thumbs-up rate", "prompt_length": "mean prompt length in chars",
               "response_length": "mean response length in chars", "unseen_prompt_share": "unseen-prompt share",
               "rejection_rate": "rejected share (by receipt time)"}


def _window(text: str) -> str:
    start, end = (dt.datetime.fromisoformat(t).astimezone(dt.timezone.utc) for t in text.split("/"))
    return f"{start:%Y-%m-%d %H:%M} → {end:%Y-%m-%d %H:%M} UTC"


def _value(x: float) -> str:
    if x is None or math.isnan(x):
        return "n/a"
    return f"{x:.4f}" if 0 < abs(x) < 0.01 else f"{x:.3f}" if abs(x) < 10 else f"{x:.1f}"


def _test_words(t: DriftTest) -> str:
    where = "all model versions" if t.scope == ALL else f"model version {t.scope}"
    vs = "" if t.baseline == t.scope else ", vs all reference traffic"
    if t.p_value is None:
        judged = f"not tested (fewer than the minimum rows: {t.n_reference:,} / {t.n_current:,})"
    else:
        p = "p < 1e-300" if t.p_value == 0 else f"p = {t.p_value:.2g}"
        judged = f"{p}, {'DRIFT' if t.drifted else 'no drift'}"
    return f"{_TEST_WORDS[t.name]} ({where}{vs}): {_value(t.reference)} → {_value(t.current)}, {judged}"


def verdict_words(finding: DriftFinding) -> tuple[str, list[str]]:
    """(headline, one line per fact): the verdict, the windows and their sizes, and each test, in words."""
    overall = next((t for t in finding.tests if t.name == "thumbs_up_rate" and t.scope == ALL), None)
    n_ref, n_cur = (overall.n_reference, overall.n_current) if overall else (0, 0)
    versions = {t.scope for t in finding.tests if t.name == "thumbs_up_rate" and t.scope != ALL}
    # with one model version its tests repeat the all-versions ones: say them once
    drifted = [t for t in finding.tests if t.drifted and (t.scope == ALL or len(versions) > 1)]
    if drifted:
        title = "DRIFT: " + "; ".join(f"{_TEST_WORDS[t.name]} {_value(t.reference)} → {_value(t.current)}"
                                      + ("" if t.scope == ALL else f" (model version {t.scope})")
                                      for t in drifted[:2]) + ("; ..." if len(drifted) > 2 else "")
    else:
        title = "No drift"
        if overall is not None:
            title += f": thumbs-up rate {_value(overall.reference)} → {_value(overall.current)}"
    lines = [f"reference window {_window(finding.reference)} ({n_ref:,} events)",
             f"current window {_window(finding.current)} ({n_cur:,} events)"]
    lines += [_test_words(t) for t in drifted]
    quiet = sorted({_TEST_WORDS[t.name] for t in finding.tests if t.p_value is not None and not t.drifted
                    and t.scope == ALL})
    untested = sorted({_TEST_WORDS[t.name] for t in finding.tests if t.p_value is None and t.scope == ALL})
    if quiet:
        lines.append("no drift in " + ", ".join(quiet))
    if untested:
        lines.append("too few rows to test " + ", ".join(untested))
    return title, lines


def _add_header(path: Path, finding: DriftFinding, config: MonitorConfig) -> None:
    """Open the HTML report on its verdict: a header with the windows, their sizes and each test in words."""
    title, _ = verdict_words(finding)
    overall = next((t for t in finding.tests if t.name == "thumbs_up_rate" and t.scope == ALL), None)
    rejection = next((t for t in finding.tests if t.name == "rejection_rate"), None)
    esc = html_lib.escape
    windows = [("reference", _window(finding.reference), f"{overall.n_reference:,}" if overall else "0"),
               ("current", _window(finding.current), f"{overall.n_current:,}" if overall else "0")]
    if rejection is not None:
        windows += [("reference (receipt time, rejections)", _window(finding.received_reference or finding.reference),
                     f"{rejection.n_reference:,} messages"),
                    ("current (receipt time, rejections)", _window(finding.received_current or finding.current),
                     f"{rejection.n_current:,} messages")]
    rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(w)}</td><td style='text-align:right'>{esc(s)}</td></tr>"
                   for n, w, s in windows)
    tests = "".join(f"<li style='color:{'#b70000' if t.drifted else 'inherit'}'>{esc(_test_words(t))}</li>"
                    for t in finding.tests)
    color = "#b70000" if finding.drifted else "#098249"
    header = (f"<header style='font-family:system-ui,sans-serif;padding:16px 24px;border-bottom:1px solid #ddd'>"
              f"<h1 style='margin:0 0 8px;font-size:24px;color:{color}'>{esc(title)}</h1>"
              f"<table style='border-collapse:collapse;font-size:14px' cellpadding='3'>"
              f"<tr><th align='left'>window</th><th align='left'>from → to</th><th align='right'>size</th></tr>"
              f"{rows}</table><ul style='font-size:14px;margin:8px 0 0'>{tests}</ul>"
              f"<p style='font-size:12px;color:#555;margin:8px 0 0'>Drift: p &lt; {config.alpha:g} and a large "
              f"enough change (thumbs-up rate by ≥ {config.min_rate_change:g}, a length by a KS distance ≥ "
              f"{config.min_ks_distance:g}, a rejected share by any significant rise). Evidently's metrics and "
              f"tests below recompute these numbers from the same counts.</p></header>")
    text = path.read_text()
    root = text.find('<div id="root_')
    head = text.find("<head>", 0, 2000)
    text = text[:root] + header + text[root:]
    if head >= 0:
        text = text[:head + 6] + f"<title>kto-loop drift report: {esc(title)}</title>" + text[head + 6:]
    path.write_text(text)


def model_label(model_id: str) -> str:
    """What the capability legend calls a model: ``reference`` for the pinned reference, else its model id."""
    return "reference" if model_id.startswith("reference:") else model_id


def capability_snapshot(store: Store, run_id: str):
    """An Evidently snapshot of one stored evaluation run (rows of ``evaluations``), for the capability panels."""
    from evidently import Report

    from monitoring.evidently_metrics import BenchmarkScore, score_dataset

    rows = store.read("SELECT model_id, suite, benchmark, metric, value, n, evaluated_at FROM evaluations "
                      "WHERE run_id = ? ORDER BY benchmark, metric", [run_id])
    if rows.is_empty():
        from ktoloop.errors import KtoLoopError

        raise KtoLoopError(f"no evaluation run {run_id!r} in {store.path}; was it stored with harness.save_run()?")
    model_id, suite, evaluated_at = rows["model_id"][0], rows["suite"][0], rows["evaluated_at"][0]
    label = model_label(model_id)
    report = Report([BenchmarkScore(benchmark=b, metric=m, model=label)
                     for b, m in rows.select("benchmark", "metric").iter_rows()],
                    metadata={"kind": "capability", "model_id": model_id, "suite": suite, "run_id": run_id},
                    tags=["capability", suite])
    frame = rows.select("model_id", "benchmark", "metric", "value", "n").to_pandas()
    return report.run(score_dataset(frame), None, timestamp=_naive_utc(evaluated_at),
                      name=f"capability {label} ({suite})")


def log_evaluation(store: Store, workspace: Path, run_id: str, config: MonitorConfig | None = None) -> str:
    """Log a stored capability run to the workspace, with a panel per benchmark's primary metric; logging the
    same run again replaces it. ``ktoloop evaluate`` and the retrain flow both call this."""
    from monitoring.tasks import TASKS
    from monitoring.workspace import log_run, stable_id

    snapshot = capability_snapshot(store, run_id)
    logged = store.read("SELECT DISTINCT benchmark, metric FROM evaluations WHERE run_id = ? ORDER BY 1, 2",
                        [run_id]).iter_rows()
    # a benchmark's primary metric (what the gate checks); every metric of one the registry does not know
    shown = [(b, m) for b, m in logged if b not in TASKS or TASKS[b].primary == m]
    return log_run(workspace, snapshot, stable_id("capability", run_id), config, benchmarks=shown)


def _naive_utc(when: dt.datetime) -> dt.datetime:
    # Evidently's workspace compares snapshot times as naive datetimes
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None)


__all__ = ["ALL", "DriftReport", "build_drift_snapshot", "capability_snapshot", "drift_report",
           "log_evaluation", "model_label", "verdict_words"]
