"""``ktoloop monitor report|ui`` and ``ktoloop evaluate``: thin handlers over the functions the flows call."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from ktoloop.config import Settings
from ktoloop.errors import KtoLoopError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    monitor = subparsers.add_parser("monitor", help="preference-drift reports and the Evidently dashboard")
    sub = monitor.add_subparsers(dest="monitor_command", metavar="ACTION", required=True)
    report = sub.add_parser("report", help="drift report between two windows of landed feedback (HTML + JSON)")
    report.add_argument("--reference-window", metavar="START/END",
                        help="e.g. 2025-01-01/2025-01-08 or -14d/-7d (default: the window before --current-window)")
    report.add_argument("--current-window", metavar="START/END",
                        help="default: the last [monitoring] window_days before the newest event")
    report.add_argument("--out", help="report folder (default: <home>/monitoring/reports)")
    report.set_defaults(func=report_command)
    ui = sub.add_parser("ui", help="serve the Evidently workspace (evidently ui)")
    ui.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    ui.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    ui.set_defaults(func=ui_command)

    evaluate = subparsers.add_parser("evaluate", help="log-likelihood benchmarks on a base model or base + adapter")
    evaluate.add_argument("--suite", choices=["quick", "full"], default="quick",
                          help="quick: a fixed sample sized in [monitoring] quick_sizes; full: every item")
    evaluate.add_argument("--reference", help="pinned reference to evaluate (default: the only one pinned)")
    evaluate.add_argument("--base", help="a model directory instead of the pinned reference")
    evaluate.add_argument("--adapter", help="peft adapter directory")
    evaluate.add_argument("--benchmarks", nargs="+", metavar="NAME", help="subset of the suite's benchmarks")
    evaluate.add_argument("--model-id", help="name stored with the results (default: from the directories)")
    evaluate.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    evaluate.set_defaults(func=evaluate_command)


def report_command(args: argparse.Namespace, settings: Settings) -> int:
    from pathlib import Path

    from ktoloop.store import Store
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.drift import Window
    from monitoring.reports import drift_report

    config = load_monitor_config(settings)
    current = Window.parse(args.current_window) if args.current_window else None
    reference = Window.parse(args.reference_window) if args.reference_window else None
    if current is not None and reference is None:
        reference = Window(current.start - (current.end - current.start), current.start)
    if reference is not None and current is None:
        raise KtoLoopError("--reference-window needs --current-window too")
    home = monitoring_dir(settings)
    result = drift_report(Store(settings.db_path, settings.store.lock_timeout_s),
                          Path(args.out) if args.out else home / "reports", reference=reference, current=current,
                          config=config, workspace=home / "workspace")
    finding = result.finding
    print(f"reference {finding.reference}\ncurrent   {finding.current}")
    print("DRIFT:\n  " + "\n  ".join(finding.reasons) if finding.drifted else "no drift")
    print(f"report: {result.html}\njson:   {result.json}\nfinding: {result.finding_json}")
    return 0


def ui_command(args: argparse.Namespace, settings: Settings) -> int:
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.workspace import open_project

    workspace = monitoring_dir(settings) / "workspace"
    open_project(workspace, load_monitor_config(settings))  # so the dashboard exists before the first report
    exe = shutil.which("evidently", path=os.path.dirname(sys.executable)) or shutil.which("evidently")
    if exe is None:
        raise KtoLoopError("the `evidently` command is not installed in this environment (pip install evidently)")
    print(f"serving {workspace} on http://{args.host}:{args.port}", flush=True)
    # exec, not a child process: Ctrl+C and kill reach the server itself, and nothing is left orphaned
    os.execv(exe, [exe, "ui", "--workspace", str(workspace), "--host", args.host, "--port", str(args.port)])
    return 0  # pragma: no cover - execv does not return


def evaluate_command(args: argparse.Namespace, settings: Settings) -> int:
    from ktoloop.store import Store
    from ktoloop.tables import format_table
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.harness import run_suite
    from monitoring.reports import log_evaluation

    base, model_id = args.base, args.model_id
    if base is None:  # the pinned reference, never a fresh copy of the model
        reference = _pinned_reference(settings, args.reference)
        base = reference.path
        if model_id is None and args.adapter is None:  # the id the retrain flow stores the reference's runs under
            model_id = f"reference:{reference.name}:{reference.sha256[:12]}"
    config, store = load_monitor_config(settings), Store(settings.db_path, settings.store.lock_timeout_s)
    run = run_suite(base, args.adapter, suite=args.suite, benchmarks=args.benchmarks, config=config, store=store,
                    model_id=model_id, device=args.device)
    log_evaluation(store, monitoring_dir(settings) / "workspace", run.run_id, config)
    print(f"run {run.run_id}  model {run.model_id}  suite {run.suite}")
    print(format_table(["benchmark", "metric", "value", "stderr", "n"], run.table()))
    return 0


def _pinned_reference(settings: Settings, name: str | None):
    from training.reference import list_references, load_reference

    if name:
        reference = load_reference(name, settings.home_dir)
    else:
        pinned = list_references(settings.home_dir)
        if len(pinned) != 1:
            raise KtoLoopError(f"pass --reference NAME or --base DIR (pinned references under "
                               f"{settings.home_dir / 'references'}: {[r.name for r in pinned] or 'none'}; "
                               "pin one with `ktoloop reference materialize-smollm2`)")
        reference = pinned[0]
    reference.verify()
    return reference
