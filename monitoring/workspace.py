"""The local Evidently workspace: one project whose dashboard follows feedback quality and capability.

The project and its panels are created on first use, so ``ktoloop monitor ui`` shows a useful dashboard
after the first report; later reports and evaluations only add runs.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_NAME = "kto-loop"
PROJECT_DESCRIPTION = "Production feedback (thumbs-up rate, drift) and capability scores of each model version."


def _panels():
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import bar_plot_panel, line_plot_panel

    def metric(kind: str, legend: str | None = None, **labels: str) -> PanelMetric:
        return PanelMetric(metric=kind, metric_labels=labels, legend=legend)

    return {
        "Feedback": [
            line_plot_panel("Thumbs-up rate over time", [metric("FeedbackShare", "all versions", stat="label", scope="*")],
                            size="half"),
            bar_plot_panel("Thumbs-up rate per model version", [metric("FeedbackShare", stat="label")], size="half"),
            line_plot_panel("Rejection rate and unseen-prompt share",
                            [metric("FeedbackShare", "rejected", stat="rejected"),
                             metric("FeedbackShare", "unseen prompts", stat="unseen_prompt")], size="full"),
        ],
        "Drift": [
            line_plot_panel("Thumbs-up drift p-value (two-proportion z-test)",
                            [metric("ShareDriftPValue", stat="label")], size="half"),
            line_plot_panel("Length drift p-values (Kolmogorov-Smirnov)",
                            [metric("DistributionDriftPValue", stat="prompt_length"),
                             metric("DistributionDriftPValue", stat="response_length")], size="half"),
            line_plot_panel("Rejection-rate drift p-value", [metric("ShareDriftPValue", stat="rejected")], size="full"),
        ],
        "Capability": [
            bar_plot_panel("Capability scores across model versions", [metric("BenchmarkScore")], size="full"),
        ],
    }


def open_project(path: Path):
    """(workspace, project), creating the workspace, project and dashboard if missing."""
    from evidently.ui.workspace import Workspace

    path.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(path))
    found = workspace.search_project(PROJECT_NAME)
    if found:
        return workspace, found[0]
    project = workspace.create_project(PROJECT_NAME, description=PROJECT_DESCRIPTION)
    for tab, panels in _panels().items():
        project.dashboard.add_tab(tab)
        for panel in panels:
            project.dashboard.add_panel(panel, tab=tab)
    return workspace, project


def log_run(path: Path, snapshot) -> str:
    """Add an Evidently snapshot (drift or capability) to the project; returns its run id."""
    workspace, project = open_project(path)
    return str(workspace.add_run(project.id, snapshot).id)
