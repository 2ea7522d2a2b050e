"""Evidently output: HTML/JSON reports, the workspace's runs and dashboard, and the CLI that writes them."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import subprocess
import sys

import polars as pl
import pytest

from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.drift import Window, find_drift
from monitoring.reports import build_drift_snapshot, drift_report
from monitoring.synthetic import feedback_frame, insert_feedback

T0 = dt.datetime(2025, 3, 1, tzinfo=dt.timezone.utc)
WEEK = dt.timedelta(days=7)


@pytest.fixture()
def three_weeks(tmp_path) -> Store:
    store = Store(tmp_path / "k.duckdb")
    for week, rate in enumerate([0.70, 0.70, 0.62]):
        insert_feedback(store, feedback_frame(5000, T0 + week * WEEK, T0 + (week + 1) * WEEK, up_rate=rate,
                                              seed=week))
    insert_feedback(store, feedback_frame(600, T0 + 2 * WEEK, T0 + 3 * WEEK, up_rate=0.5, model_version="v2",
                                          seed=9))
    return store


def report_verdicts(report_json: dict) -> dict[tuple[str, str], bool]:
    """(finding test name, scope) -> drift, as the Evidently report's tests say."""
    return {(t["metric_config"]["params"]["test"], t["metric_config"]["params"]["scope"]): t["status"] == "FAIL"
            for t in report_json["tests"]}


def finding_verdicts(finding) -> dict[tuple[str, str], bool]:
    return {(t.name, t.scope): t.drifted for t in finding.tests if t.p_value is not None}


def label_counts(n: int, reference_rate: float, current_rate: float) -> pl.DataFrame:
    """A count table (see monitoring.drift.count_table): n thumbs per window, for all versions and for v1."""
    rows = [(period, scope, "label", key, n * rate if key else n * (1 - rate))
            for period, rate in (("reference", reference_rate), ("current", current_rate))
            for scope in ("*", "v1") for key in (1, 0)]
    return pl.DataFrame(rows, schema={"period": pl.Utf8, "scope": pl.Utf8, "stat": pl.Utf8, "key": pl.Int64,
                                      "count": pl.Float64}, orient="row")


@pytest.mark.parametrize("current_rate,drift", [(0.505, False), (0.530, True)])
def test_report_and_finding_apply_one_rule_at_large_n(current_rate, drift):
    """2,000,000 thumbs a window: 0.500 -> 0.505 is significant (p ~ 1e-23) but below min_rate_change (0.02).
    The report's test used to check only p < alpha, so it flagged drift the finding did not."""
    config = MonitorConfig()
    table = label_counts(2_000_000, 0.500, current_rate)
    finding = find_drift(table, Window(T0, T0 + WEEK), Window(T0 + WEEK, T0 + 2 * WEEK), config)
    rate = next(t for t in finding.tests if t.name == "thumbs_up_rate" and t.scope == "*")
    assert rate.p_value < config.alpha and finding.drifted is drift  # significant either way; drift only at 0.03

    report = json.loads(build_drift_snapshot(table, finding, Window(T0 + WEEK, T0 + 2 * WEEK), config).json())
    assert all(t["status"] == "SUCCESS" for t in report["tests"]) is not drift
    assert report_verdicts(report) == finding_verdicts(finding) == {("thumbs_up_rate", "*"): drift,
                                                                    ("thumbs_up_rate", "v1"): drift}


def series(workspace, project_id, metric_type: str, tags: list[str] | None = None, **labels: str):
    from evidently.ui.service.base import SeriesFilter
    from evidently.ui.service.storage.local.base import InMemoryDataStorage

    storage = InMemoryDataStorage(str(workspace))
    flt = SeriesFilter(tags=tags or [], metadata={}, metric=f"evidently:metric_v2:{metric_type}", metric_labels=labels)
    return asyncio.run(storage.get_data_series(project_id, [flt], None, None)).series


@pytest.mark.slow
def test_two_reports_fill_the_workspace_and_its_panels(three_weeks, tmp_path):
    from monitoring.workspace import open_project

    ws, out = tmp_path / "workspace", tmp_path / "reports"
    first = drift_report(three_weeks, out, reference=Window(T0, T0 + WEEK), current=Window(T0 + WEEK, T0 + 2 * WEEK),
                         workspace=ws)
    second = drift_report(three_weeks, out, reference=Window(T0 + WEEK, T0 + 2 * WEEK),
                          current=Window(T0 + 2 * WEEK, T0 + 3 * WEEK), workspace=ws)
    assert not first.finding.drifted and second.finding.drifted
    for report, current, size in ((first, "2025-03-08 00:00 → 2025-03-15 00:00 UTC", "5,000"),
                                  (second, "2025-03-15 00:00 → 2025-03-22 00:00 UTC", "5,600")):
        text = report.html.read_text()
        assert report.html.stat().st_size > 10_000 and "<html" in text[:2000].lower()
        verdict = "DRIFT: thumbs-up rate 0.700 → 0.607" if report.finding.drifted else "No drift"
        assert f"<title>kto-loop drift report: {verdict}" in text[:3000]  # the first view: verdict and windows
        header = text[text.index("<header"):text.index("</header>")]
        assert verdict in header and f"<td>{current}</td><td style='text-align:right'>{size}</td>" in header
        metrics = json.loads(report.json.read_text())["metrics"]
        finding = json.loads(report.finding_json.read_text())
        # the Evidently metric recomputes the finding's p-value from the same counts
        evidently_p = next(m["value"] for m in metrics if m["config"]["type"].endswith("ShareDriftPValue")
                           and m["config"]["stat"] == "label" and m["config"]["scope"] == "*")
        assert evidently_p == pytest.approx(finding["p_values"]["thumbs_up_rate[*]"])
        assert report_verdicts(json.loads(report.json.read_text())) == finding_verdicts(report.finding)

    workspace, project = open_project(ws)
    drift_runs = [s for s in workspace.list_runs(project.id) if workspace.get_run(project.id, s).tags == ["drift"]]
    assert len(drift_runs) == 2
    dashboard = workspace.get_dashboard(project.id)
    titles = [p.title for p in dashboard.panels]
    assert titles[0].startswith("DRIFT: thumbs-up rate 0.700 → 0.607")  # the second report's verdict, in words
    assert {"Thumbs-up rate per day (event time)", "Drift p-values of the shares (two-proportion z-test)",
            "Capability"} <= set(titles)
    # the drift runs: one point per report, at the end of its current window
    overall = series(ws, project.id, "FeedbackShare", tags=["drift"], stat="label", scope="*")
    assert [round(v, 3) for v in overall[0].values] == [0.70, round((0.62 * 5000 + 300) / 5600, 3)]
    per_version = {s.params["scope"]: s.values for s in series(ws, project.id, "FeedbackShare", tags=["drift"],
                                                                 stat="label")}
    assert per_version["v2"][-1] == pytest.approx(0.5)
    assert {s.params["stat"] for s in series(ws, project.id, "ShareDriftPValue")} >= {"label"}


@pytest.mark.slow
def test_workspace_loads_without_our_metric_classes(three_weeks, tmp_path):
    """`evidently ui` runs in its own process, which never imports monitoring: snapshots must load there."""
    ws = tmp_path / "workspace"
    drift_report(three_weeks, tmp_path / "r", reference=Window(T0, T0 + WEEK),
                 current=Window(T0 + WEEK, T0 + 2 * WEEK), workspace=ws)
    code = ("import sys; from evidently.ui.service.storage.local.base import LocalState; "
            "s = LocalState.load(sys.argv[1], None); print(sum(len(v) for v in s.snapshots.values()))")
    out = subprocess.run([sys.executable, "-c", code, str(ws)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    written = len(list(ws.glob("*/snapshots/*.json")))  # the drift run and 21 days of each clock's buckets
    assert written == 1 + 2 * 21 and out.stdout.strip().endswith(str(written))


def test_capability_runs_show_per_model_and_log_once(tmp_path):
    from monitoring.harness import BenchmarkResult, EvalRun, save_run
    from monitoring.reports import log_evaluation
    from monitoring.workspace import open_project

    ws, store = tmp_path / "workspace", Store(tmp_path / "k.duckdb")
    for i, (model_id, acc) in enumerate([("reference:smollm2:0123456789ab", 0.52), ("kto-s1-c1", 0.55)]):
        result = BenchmarkResult("arc_easy", {"acc": (acc, 0.02), "acc_norm": (acc - 0.01, 0.02)}, [0, 1], {}, 1.0)
        run = EvalRun(f"run-{i}", model_id, None, "quick", {"arc_easy": result}, T0 + dt.timedelta(minutes=i))
        save_run(store, run)
        log_evaluation(store, ws, run.run_id)
    log_evaluation(store, ws, "run-1")  # a flow re-run reuses the stored run: logged again, not twice
    workspace, project = open_project(ws)
    assert len(workspace.list_runs(project.id)) == 2
    acc = {s.params["model"]: s.values for s in series(ws, project.id, "BenchmarkScore", benchmark="arc_easy",
                                                         metric="acc")}
    assert acc == {"reference": [pytest.approx(0.52)], "kto-s1-c1": [None, pytest.approx(0.55)]}
    panel = next(p for p in workspace.get_dashboard(project.id).panels if p.title.startswith("arc_easy"))
    assert panel.title == "arc_easy: acc_norm (higher is better)"  # the primary metric, the one the gate checks
    assert panel.values[0].legend == "{{model}}"


def test_cli_monitor_report(three_weeks, tmp_path, monkeypatch, capsys):
    from ktoloop.cli import main

    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("KTOLOOP_HOME", str(home))
    monkeypatch.delenv("KTOLOOP_CONFIG", raising=False)
    (home / "ktoloop.duckdb").write_bytes(three_weeks.path.read_bytes())
    assert main(["monitor", "report", "--current-window", f"{(T0 + 2 * WEEK).isoformat()}/{(T0 + 3 * WEEK).isoformat()}"]) == 0
    out = capsys.readouterr().out
    assert "DRIFT" in out and "thumbs_up_rate" in out
    assert list((home / "monitoring" / "reports").glob("*.html"))
    assert (home / "monitoring" / "workspace").is_dir()
    assert main(["monitor", "report", "--reference-window=-14d/-7d"]) == 2  # needs --current-window too
