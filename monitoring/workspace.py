"""The local Evidently workspace: one project whose dashboard follows feedback quality, drift and capability.

The dashboard is code: every ``open_project`` writes it again (keeping the latest verdict and the capability
panels of benchmarks seen), so an old workspace gets the current design. Evidently 0.7's open-source UI draws
``dashboard.panels`` in order and ignores tabs (its API refuses a second tab), so the Feedback, Drift and
Capability sections are headed by text panels on one page instead. Snapshot ids derive from what they
describe (a bucket, a pair of windows, an evaluation run), so logging the same thing twice overwrites it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from pathlib import Path

from monitoring.config import MonitorConfig

PROJECT_NAME = "kto-loop"
PROJECT_DESCRIPTION = "Production feedback (thumbs-up rate, drift) and capability scores of each model version."
_NAMESPACE = uuid.UUID("6f1c3d9e-4b0a-4c55-9a43-2f1e0d7b8a61")
VERDICT_PANEL = uuid.uuid5(_NAMESPACE, "panel:verdict")
"""Id of the text panel that says the latest drift verdict in words (``stable_id("panel", "verdict")``)."""
NO_VERDICT = ("Drift verdict: no report yet",
              "Run `ktoloop monitor report` (or the monitor flow) to compare two windows of landed feedback.")


def stable_id(*parts: str) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, ":".join(parts))


def _panels(config: MonitorConfig, verdict: tuple[str, str], benchmarks: list[tuple[str, str]]) -> list:
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel, text_panel

    from monitoring.timeline import EVENT, RECEIPT, WINDOW_SCOPES, bucket_words, tag

    def metric(kind: str, legend: str, tags: list[str], **labels: str) -> PanelMetric:
        return PanelMetric(metric=kind, metric_labels=labels, legend=legend, tags=tags)

    def fixed(panel, name: str):
        panel.id = stable_id("panel", name)
        return panel

    per, event, receipt = bucket_words(config), [tag(EVENT, config)], [tag(RECEIPT, config)]
    # a series takes the legend of the first value whose labels it matches: specific values come first.
    # Bars where one point is common: a line chart of a single value labels its only gridline with it, rounded
    panels = [
        text_panel(*verdict),
        text_panel("Feedback", "Landed feedback by event time (when the thumbs were given), one point per "
                               f"{per}; dead letters by the time they were received."),
        line_plot_panel(f"Thumbs-up rate per {per} (event time)", [
            metric("FeedbackShare", "thumbs-up rate, all model versions", event, stat="label", scope="*"),
            metric("FeedbackShare", "reference window (its overall rate)", event, stat="label",
                   scope=WINDOW_SCOPES["reference"]),
            metric("FeedbackShare", "current window (its overall rate)", event, stat="label",
                   scope=WINDOW_SCOPES["current"]),
            metric("FeedbackShare", "thumbs-up rate, model version {{scope}}", event, stat="label"),
        ], description="Flat lines: the whole reference and current windows of the latest drift report.",
            size="full"),
        bar_plot_panel(f"Feedback events per {per} (event time)",
                       [metric("EventCount", "events, all model versions", event, stat="label", scope="*")],
                       size="full"),
        bar_plot_panel(f"Rejected share per {per} (receipt time)",
                        [metric("FeedbackShare", "rejected share", receipt,
                                stat="rejected")],
                        description="Dead letters / messages received. Dead letters have no event time, so both "
                                    "are counted by when they were received.", size="half"),
        bar_plot_panel(f"Dead letters per {per} (receipt time)",
                       [metric("EventCount", "dead letters", receipt, stat="rejected", key="1")], size="half"),
        text_panel("Drift", "One point per drift report (at the end of its current window). Drift needs "
                            f"p < {config.alpha:g} and a large enough change (thumbs-up rate by "
                            f"{config.min_rate_change:g}, a length by a KS distance of {config.min_ks_distance:g})."),
        bar_plot_panel("Drift p-values of the shares (two-proportion z-test)", [
            metric("ShareDriftPValue", "thumbs-up rate, all model versions", ["drift"], stat="label", scope="*"),
            metric("ShareDriftPValue", "rejected share", ["drift"], stat="rejected"),
            metric("ShareDriftPValue", "thumbs-up rate, model version {{scope}}", ["drift"], stat="label"),
        ], size="half"),
        bar_plot_panel("Drift p-values of the lengths (Kolmogorov-Smirnov)", [
            metric("DistributionDriftPValue", "prompt length, all model versions", ["drift"], stat="prompt_length",
                   scope="*"),
            metric("DistributionDriftPValue", "response length, all model versions", ["drift"],
                   stat="response_length", scope="*"),
        ], size="half"),
        text_panel("Capability", "Every evaluated model side by side: the pinned reference and each candidate "
                                 "(by model id), one bar per evaluation run." if benchmarks else
                   "No capability run yet: a retrain or `ktoloop evaluate` logs its runs here."),
    ]
    ids = ["verdict", "feedback", "thumbs-up", "events", "rejected", "dead-letters", "drift", "share-p", "length-p",
           "capability"]
    for panel, name in zip(panels, ids, strict=True):
        fixed(panel, name)
    for benchmark, metric_name in benchmarks:
        panels.append(fixed(bar_plot_panel(f"{benchmark}: {metric_name} ({_direction(benchmark)})",
                                           [metric("BenchmarkScore", "{{model}}", ["capability"], benchmark=benchmark,
                                                   metric=metric_name)], size="half"),
                            f"capability:{benchmark}:{metric_name}"))
    return panels


def _direction(benchmark: str) -> str:
    from monitoring.tasks import TASKS

    if benchmark not in TASKS:  # logged by another version of the registry
        return "as logged"
    return "higher is better" if TASKS[benchmark].higher_is_better else "lower is better"


def open_project(path: Path, config: MonitorConfig | None = None, *, verdict: tuple[str, str] | None = None,
                 benchmarks: Iterable[tuple[str, str]] = ()):
    """(workspace, project), creating them if missing, and (re)writing the dashboard.

    ``verdict``: (title, text) of the latest drift report (default: the one shown now); ``benchmarks``:
    (benchmark, metric) pairs to give capability panels, added to those the dashboard has."""
    from evidently.sdk.models import DashboardModel, DashboardTabModel
    from evidently.ui.workspace import Workspace

    config = config or MonitorConfig()
    path.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(path))
    found = workspace.search_project(PROJECT_NAME)
    project = found[0] if found else workspace.create_project(PROJECT_NAME, description=PROJECT_DESCRIPTION)
    existing = workspace.get_dashboard(project.id)
    shown = next((p for p in existing.panels if p.id == VERDICT_PANEL), None)
    verdict = verdict or ((shown.title, shown.subtitle or "") if shown else NO_VERDICT)
    seen = [(v.metric_labels["benchmark"], v.metric_labels["metric"]) for p in existing.panels for v in p.values
            if v.metric.endswith(":BenchmarkScore") and {"benchmark", "metric"} <= v.metric_labels.keys()]
    wanted = list(dict.fromkeys([*seen, *benchmarks]))
    panels = _panels(config, verdict, wanted)
    dashboard = DashboardModel(tabs=[DashboardTabModel(id=stable_id("tab", "dashboard"), title="Dashboard",
                                                       panels=[p.id for p in panels])], panels=panels)
    if dashboard.dict() != existing.dict():
        workspace.save_dashboard(project.id, dashboard)
    return workspace, project


def log_run(path: Path, snapshot, snapshot_id: uuid.UUID | None = None, config: MonitorConfig | None = None,
            **dashboard) -> str:
    """Write an Evidently snapshot to the project under ``snapshot_id`` (a new id when None; the same id
    replaces the snapshot); ``dashboard``: what ``open_project`` takes. Returns the run id."""
    workspace, project = open_project(path, config, **dashboard)
    if snapshot_id is None:
        return str(workspace.add_run(project.id, snapshot).id)
    workspace.state.write_snapshot(project.id, snapshot_id, snapshot.to_snapshot_model())
    return str(snapshot_id)


def log_buckets(path: Path, buckets, config: MonitorConfig) -> int:
    """Log the buckets (``monitoring.timeline``) not yet logged with the same counts; returns how many were written."""
    from monitoring.timeline import tag

    workspace, project = open_project(path, config)
    written = 0
    for bucket in buckets:
        snapshot_id = stable_id("bucket", tag(bucket.clock, config), bucket.start.isoformat())
        try:
            logged = workspace.state.read_snapshot(project.id, snapshot_id).metadata.get("digest")
        except FileNotFoundError:
            logged = None
        if logged != bucket.digest:
            workspace.state.write_snapshot(project.id, snapshot_id, bucket.snapshot(config).to_snapshot_model())
            written += 1
    return written
