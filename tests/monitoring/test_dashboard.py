"""The dashboard a person opens after a backfill: served by `ktoloop monitor ui`, read through the same HTTP API
the panels call (GET the dashboard, POST each panel's series filters), and rendered in headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.drift import Window
from monitoring.harness import BenchmarkResult, EvalRun, save_run
from monitoring.reports import drift_report, log_evaluation
from monitoring.synthetic import feedback_frame, insert_dead_letters, insert_feedback

pytestmark = pytest.mark.slow  # an Evidently UI server and headless Chromium

REPO = Path(__file__).resolve().parents[2]
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
DAY = dt.timedelta(days=1)
RECEIVED = dt.datetime(2026, 2, 1, 12, tzinfo=dt.timezone.utc)
"""The backfill lands every event, and 10 dead letters, a month after the events happened."""
V1_RATES = [0.70, 0.70, 0.70, 0.55, 0.55, 0.55]
V2_RATE, V1_PER_DAY, V2_PER_DAY = 0.40, 800, 200  # v2 serves from day 4 on
CANDIDATE = "kto-s1-c1"


def backfill(home: Path) -> tuple[str, int]:
    """Six days of landed feedback, two capability runs and two drift reports (the second must add nothing)."""
    store = Store(home / "ktoloop.duckdb")
    for day, rate in enumerate(V1_RATES):
        insert_feedback(store, feedback_frame(V1_PER_DAY, T0 + day * DAY, T0 + (day + 1) * DAY, up_rate=rate, seed=day))
        if day >= 3:
            insert_feedback(store, feedback_frame(V2_PER_DAY, T0 + day * DAY, T0 + (day + 1) * DAY, up_rate=V2_RATE,
                                                  model_version="v2", seed=10 + day))
    with store.writer() as con:
        con.execute("UPDATE feedback SET ingested_at = ?", [RECEIVED])
    insert_dead_letters(store, [RECEIVED + dt.timedelta(minutes=m) for m in range(10)])
    workspace = home / "monitoring" / "workspace"
    for i, (model_id, acc) in enumerate([("reference:smollm2:0123456789ab", 0.52), (CANDIDATE, 0.55)]):
        result = BenchmarkResult("arc_easy", {"acc": (acc, 0.02), "acc_norm": (acc - 0.01, 0.02)}, [0, 1], {}, 1.0)
        run = EvalRun(f"run-{i}", model_id, None, "quick", {"arc_easy": result}, RECEIVED + dt.timedelta(hours=i))
        save_run(store, run)
        log_evaluation(store, workspace, run.run_id)
    windows = {"reference": Window(T0, T0 + 3 * DAY), "current": Window(T0 + 3 * DAY, T0 + 6 * DAY)}
    counts = []
    for _ in range(2):
        drift_report(store, home / "monitoring" / "reports", config=MonitorConfig(), workspace=workspace, **windows)
        counts.append(len(list(workspace.glob("*/snapshots/*.json"))))
    assert counts[0] == counts[1] == 6 + 1 + 1 + 2  # event days, the receipt day, the drift run, two evaluations
    return str(next(p.name for p in workspace.iterdir() if p.is_dir() and len(p.name) == 36)), counts[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, project id): `ktoloop monitor ui` on a free loopback port, over the backfilled home."""
    home = tmp_path_factory.mktemp("home")
    project_id, _ = backfill(home)
    port = free_port()
    env = {**os.environ, "KTOLOOP_HOME": str(home), "PYTHONPATH": str(REPO)}
    env.pop("KTOLOOP_CONFIG", None)
    log = (home / "ui.log").open("w")
    server = subprocess.Popen([sys.executable, "-c", "import sys; from ktoloop.cli import main; sys.exit(main())",
                               "monitor", "ui", "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                get(f"{base}/api/projects")
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"`ktoloop monitor ui` did not serve {base}: {(home / 'ui.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield base, project_id
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


def panel_series(base: str, project_id: str, title_start: str) -> tuple[dict, dict[str, list]]:
    """(panel, legend -> values, one per source) as the UI draws them: the legend of the first value whose
    labels match, with {{label}} filled in from the series' labels."""
    dashboard = get(f"{base}/api/v2/dashboards/{project_id}")
    panel = next(p for p in dashboard["panels"] if p["title"].startswith(title_start))
    body = {"series_filter": [{k: v[k] for k in ("metric", "tags", "metadata", "metric_labels")}
                              for v in panel["values"]]}
    data = get(f"{base}/api/v2/snapshots/{project_id}/data_series_batch", body)
    out = {}
    for s in data["series"]:
        legend = panel["values"][s["filter_index"]]["legend"]
        for key, value in s["params"].items():
            legend = legend.replace("{{" + key + "}}", value)
        out[legend] = s["values"] + [None] * (len(data["sources"]) - len(s["values"]))
    panel["sources"] = [dt.datetime.fromisoformat(s["timestamp"]) for s in data["sources"]]
    return panel, out


def test_thumbs_up_panel_has_one_point_per_day_with_the_landed_rates(served):
    panel, lines = panel_series(*served, "Thumbs-up rate per day")
    assert panel["sources"] == [(T0 + d * DAY).replace(tzinfo=None) for d in range(6)]  # two reports, still 6
    overall = [(V1_PER_DAY * r + (V2_PER_DAY * V2_RATE if d >= 3 else 0)) / (V1_PER_DAY + (V2_PER_DAY if d >= 3 else 0))
               for d, r in enumerate(V1_RATES)]
    assert lines["thumbs-up rate, all model versions"] == pytest.approx(overall)
    assert lines["thumbs-up rate, model version v1"] == pytest.approx(V1_RATES)
    assert lines["thumbs-up rate, model version v2"] == [None] * 3 + [pytest.approx(V2_RATE)] * 3
    # the windows of the report: their overall rates, drawn across their own days only
    assert lines["reference window (its overall rate)"] == [pytest.approx(0.70)] * 3 + [None] * 3
    assert lines["current window (its overall rate)"] == [None] * 3 + [pytest.approx(0.52)] * 3
    assert not any("FeedbackShare" in legend or "stat:" in legend for legend in lines)


def test_verdict_rejections_and_capability_panels(served):
    dashboard = get(f"{served[0]}/api/v2/dashboards/{served[1]}")
    verdict = dashboard["panels"][0]
    assert verdict["title"].startswith("DRIFT: thumbs-up rate 0.700 → 0.520")
    assert "reference window 2026-01-01 00:00 → 2026-01-04 00:00 UTC (2,400 events)" in verdict["subtitle"]

    # dead letters and landed events on one clock (receipt time): the month-later backfill is one bucket
    panel, rejected = panel_series(*served, "Rejected share per day")
    landed = 3 * V1_PER_DAY + 3 * (V1_PER_DAY + V2_PER_DAY)
    assert panel["sources"] == [RECEIVED.replace(hour=0, tzinfo=None)]
    assert rejected == {"rejected share": [pytest.approx(10 / (10 + landed))]}
    assert panel_series(*served, "Dead letters per day")[1] == {"dead letters": [10]}

    panel, bars = panel_series(*served, "arc_easy")
    assert panel["title"] == "arc_easy: acc_norm (higher is better)"
    assert bars == {"reference": [pytest.approx(0.51), None], CANDIDATE: [None, pytest.approx(0.54)]}


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed and `make install` could not install it (apt-get install chromium)")
    return exe


def test_dashboard_renders_in_headless_chromium(served, tmp_path):
    """What a person sees: the panels drawn with their plain-word legends, not an empty or failed page."""
    base, project_id = served
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,1800", "--virtual-time-budget=20000"]
    url = f"{base}/projects/{project_id}"
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    for text in ("DRIFT: thumbs-up rate", "Thumbs-up rate per day (event time)", "thumbs-up rate, all model versions",
                 "reference window (its overall rate)", "rejected share", CANDIDATE):
        assert text in dom, f"{text!r} is not on the rendered dashboard"
    assert "This dashboard is currently empty" not in dom
    shot = tmp_path / "dashboard.png"
    subprocess.run([*args, f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000  # charts drawn, not a blank page
