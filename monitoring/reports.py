"""Evidently reports: drift (from the count table) and capability scores (from an evaluation run).

``drift_report`` is what ``ktoloop monitor report`` and the monitoring flow call: it aggregates, tests,
writes HTML + JSON (Evidently's report and our finding), and logs the run to the local workspace.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.drift import ALL, DriftFinding, Window, default_windows, drift_finding


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
        if metric_type is ShareDriftPValue:
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
    """Compare two windows of landed feedback; write reports under ``out_dir`` and log to ``workspace``."""
    config = config or MonitorConfig()
    if reference is None or current is None:
        default_ref, default_cur = default_windows(store, config.window_days)
        reference, current = reference or default_ref, current or default_cur
    finding, table = drift_finding(store, reference, current, config)
    snapshot = build_drift_snapshot(table, finding, current, config)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"drift-{current.end.astimezone(dt.timezone.utc):%Y%m%dT%H%M%S}"
    html, report_json, finding_json = out_dir / f"{stem}.html", out_dir / f"{stem}.json", out_dir / f"{stem}.finding.json"
    snapshot.save_html(str(html))
    snapshot.save_json(str(report_json))
    finding_json.write_text(json.dumps(finding.to_dict(), indent=2, default=str))
    snapshot_id = None
    if workspace is not None:
        from monitoring.workspace import log_run

        snapshot_id = log_run(workspace, snapshot)
    return DriftReport(finding, html, report_json, finding_json, snapshot_id)


def capability_snapshot(run):
    """An Evidently snapshot of one evaluation run (``harness.EvalRun``), for the capability panels."""
    import pandas as pd
    from evidently import Report

    from monitoring.evidently_metrics import BenchmarkScore, score_dataset

    frame = pd.DataFrame([{"model_id": run.model_id, "benchmark": b, "metric": m, "value": v, "n": n}
                          for b, m, v, _, n in run.table()])
    report = Report([BenchmarkScore(benchmark=b, metric=m) for b, m, *_ in run.table()],
                    metadata={"kind": "capability", "model_id": run.model_id, "suite": run.suite, "run_id": run.run_id},
                    tags=["capability", run.suite])
    return report.run(score_dataset(frame), None, timestamp=_naive_utc(run.evaluated_at),
                      name=f"capability {run.model_id} ({run.suite})")


def _naive_utc(when: dt.datetime) -> dt.datetime:
    # Evidently's workspace compares snapshot times as naive datetimes
    return when.astimezone(dt.timezone.utc).replace(tzinfo=None)


__all__ = ["ALL", "DriftReport", "build_drift_snapshot", "capability_snapshot", "drift_report"]
