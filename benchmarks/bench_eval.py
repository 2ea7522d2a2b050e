"""Monitoring throughput: quick-suite items/s on SmolLM2-135M (CPU), and a drift report over 1M events.

    .venv/bin/python benchmarks/bench_eval.py                 # both
    .venv/bin/python benchmarks/bench_eval.py --skip-eval     # drift only (seconds)
    .venv/bin/python benchmarks/bench_eval.py --events 200000 --skip-drift

Goal: the drift report over 1M events in <= 10 s (aggregation + tests + Evidently HTML/JSON + workspace).
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path


def bench_eval(device: str) -> list[tuple[str, str]]:
    from monitoring.config import MonitorConfig
    from monitoring.harness import evaluate
    from training.modeling import load_model, materialize_smollm2

    model, tok = load_model(materialize_smollm2(Path.home() / ".cache" / "ktoloop" / "smollm2-135m-instruct"),
                            device=device)
    started = time.perf_counter()
    results = evaluate(model, tok, "quick", config=MonitorConfig(), progress=False)
    total = time.perf_counter() - started
    rows = [(f"quick/{name}", f"{r.n} items, {r.seconds:6.1f} s, {r.n / r.seconds:6.2f} items/s") for name, r in
            results.items()]
    n = sum(r.n for r in results.values())
    rows.append(("quick suite (total)", f"{n} items, {total:6.1f} s, {n / total:6.2f} items/s on {device}"))
    return rows


def bench_drift(events: int) -> list[tuple[str, str]]:
    from ktoloop.store import Store
    from monitoring.drift import Window, drift_finding
    from monitoring.reports import drift_report
    from monitoring.synthetic import feedback_frame, insert_feedback

    root = Path(tempfile.mkdtemp(prefix="bench_drift_"))
    store = Store(root / "k.duckdb")
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    week = dt.timedelta(days=7)
    started = time.perf_counter()
    half = events // 2
    # reference: v1 only; current: v1 slightly worse, a new v2 with longer responses
    insert_feedback(store, feedback_frame(half, t0, t0 + week, up_rate=0.70, prompt_pool=50_000, seed=1))
    insert_feedback(store, feedback_frame(half * 8 // 10, t0 + week, t0 + 2 * week, up_rate=0.68,
                                          prompt_pool=50_000, seed=2))
    insert_feedback(store, feedback_frame(half - half * 8 // 10, t0 + week, t0 + 2 * week, up_rate=0.66,
                                          model_version="v2", response_chars=380, prompt_pool=50_000, seed=3))
    load_s = time.perf_counter() - started
    reference, current = Window(t0, t0 + week), Window(t0 + week, t0 + 2 * week)
    started = time.perf_counter()
    finding, table = drift_finding(store, reference, current)
    finding_s = time.perf_counter() - started
    import evidently  # noqa: F401  (import time is not report time)

    started = time.perf_counter()
    report = drift_report(store, root / "reports", reference=reference, current=current, workspace=root / "ws")
    report_s = time.perf_counter() - started
    return [
        ("drift: synthetic load", f"{events:,} events in {load_s:5.1f} s"),
        ("drift: finding (DuckDB + tests)", f"{finding_s:5.2f} s, {len(table)} count rows"),
        ("drift: full report", f"{report_s:5.2f} s (finding + Evidently HTML/JSON + workspace) "
                               f"{'OK' if report_s <= 10 else 'OVER'} vs 10 s goal"),
        ("drift: verdict", "; ".join(report.finding.reasons) or "no drift"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    args = parser.parse_args()
    rows = []
    if not args.skip_drift:
        rows += bench_drift(args.events)
    if not args.skip_eval:
        rows += bench_eval(args.device)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure':<{width}}  result\n{'-' * width}  {'-' * 60}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
