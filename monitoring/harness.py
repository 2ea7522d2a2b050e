"""Run an evaluation suite on a model (base or base + adapter) and store the results in DuckDB.

Suites pick the items: ``quick`` is a fixed, seeded sample per benchmark (for gates inside a retrain),
``full`` is every item. Per-item scores are stored too, so two runs can be compared item by item.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ktoloop.errors import KtoLoopError
from ktoloop.progress import Progress
from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.scoring import loglikelihood
from monitoring.tasks import Aggregate, get_task

log = logging.getLogger(__name__)


def _quick(config: MonitorConfig, names: Sequence[str] | None) -> dict[str, int | None]:
    names = list(names) if names else list(config.quick_sizes)
    missing = [n for n in names if n not in config.quick_sizes]
    if missing:
        raise KtoLoopError(f"no quick-suite size for {missing}; add them to [monitoring] quick_sizes")
    return {n: config.quick_sizes[n] for n in names}


def _full(config: MonitorConfig, names: Sequence[str] | None) -> dict[str, int | None]:
    return {n: None for n in (names or config.full_benchmarks)}


SUITES: dict[str, Callable[[MonitorConfig, Sequence[str] | None], dict[str, int | None]]] = {
    "quick": _quick,
    "full": _full,
}
"""suite -> which benchmarks, and how many items of each (None = all)."""


def sample_ids(benchmark: str, total: int, size: int | None, seed: int) -> list[int]:
    """The same (benchmark, size, seed) always gives the same items, whatever else changed."""
    if size is None or size >= total:
        return list(range(total))
    return sorted(random.Random(f"{seed}:{benchmark}").sample(range(total), size))


@dataclass(frozen=True)
class BenchmarkResult:
    benchmark: str
    metrics: Aggregate
    item_ids: list[int]
    per_item: dict[str, list[float]]
    """metric -> value per item, aligned with ``item_ids``."""
    seconds: float

    @property
    def n(self) -> int:
        return len(self.item_ids)


@dataclass(frozen=True)
class EvalRun:
    run_id: str
    model_id: str
    adapter: str | None
    suite: str
    results: dict[str, BenchmarkResult]
    evaluated_at: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))

    def table(self) -> list[tuple[str, str, float, float | None, int]]:
        """(benchmark, metric, value, stderr, n) rows, for printing and storing."""
        return [(b, m, v, se, r.n) for b, r in self.results.items() for m, (v, se) in r.metrics.items()]


def evaluate(model, tokenizer, suite: str = "quick", benchmarks: Sequence[str] | None = None,
             config: MonitorConfig | None = None, progress: bool = True) -> dict[str, BenchmarkResult]:
    """Score a loaded model on a suite; no storage, so tests and notebooks can call it directly."""
    config = config or MonitorConfig()
    if suite not in SUITES:
        raise KtoLoopError(f"unknown suite {suite!r}; known: {sorted(SUITES)}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = {}  # every benchmark's requests first, so the suite's progress line knows the total
    for name, size in SUITES[suite](config, benchmarks).items():
        task = get_task(name)
        started = time.perf_counter()
        all_items = task.items(config.benchmarks_path)
        ids = sample_ids(name, len(all_items), size, config.seed)
        items = [all_items[i] for i in ids]
        requests, spans = [], []
        for item in items:
            reqs = task.kind.requests(item, tokenizer, config.max_length)
            spans.append((len(requests), len(requests) + len(reqs)))
            requests += reqs
        encoded[name] = (task, ids, items, requests, spans, time.perf_counter() - started)
    suite_progress = Progress(f"capability suite {suite}", sum(len(e[3]) for e in encoded.values()), "requests", log)
    results = {}
    for name, (task, ids, items, requests, spans, encode_s) in encoded.items():
        started = time.perf_counter() - encode_s
        scores = loglikelihood(model, requests, batch_tokens=config.batch_tokens, max_length=config.max_length,
                               pad_id=pad_id, desc=name, progress=progress, on_batch=suite_progress.update)
        per_item: dict[str, list[float]] = {}
        for item, (a, b) in zip(items, spans, strict=True):
            for metric, value in task.kind.score(item, scores[a:b]).items():
                per_item.setdefault(metric, []).append(value)
        metrics = task.kind.aggregate(items, per_item)
        if task.metrics:
            metrics = {m: metrics[m] for m in task.metrics}
        results[name] = BenchmarkResult(name, metrics, ids, per_item, time.perf_counter() - started)
        log.info("%s: %s (n=%d, %.1f s)", name, {m: round(v, 4) for m, (v, _) in metrics.items()}, len(ids),
                 results[name].seconds)
    return results


def run_suite(base_dir: str | Path, adapter_dir: str | Path | None = None, *, suite: str = "quick",
              benchmarks: Sequence[str] | None = None, config: MonitorConfig | None = None,
              store: Store | None = None, model_id: str | None = None, device: str | None = None,
              progress: bool = True) -> EvalRun:
    """Load the model, run the suite, store the run (when ``store`` is given) and return it.

    ``model_id`` names the model in the ``evaluations`` table (the registry version, say); by default it is
    the base directory's name, plus ``+<adapter dir name>`` for an adapter.
    """
    from training.modeling import load_model

    model, tokenizer = load_model(base_dir, adapter_dir, device=device)
    model_id = model_id or Path(base_dir).name + (f"+{Path(adapter_dir).name}" if adapter_dir else "")
    results = evaluate(model, tokenizer, suite, benchmarks, config, progress)
    run = EvalRun(uuid.uuid4().hex, model_id, str(adapter_dir) if adapter_dir else None, suite, results)
    if store is not None:
        save_run(store, run)
    return run


def save_run(store: Store, run: EvalRun) -> None:
    with store.writer() as con:
        con.executemany(
            "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(run.run_id, run.model_id, run.adapter, run.suite, b, m, v, n, se, run.evaluated_at)
             for b, m, v, se, n in run.table()])
        item_rows = [(run.run_id, b, m, i, v) for b, r in run.results.items()
                     for m, values in r.per_item.items() for i, v in zip(r.item_ids, values, strict=True)]
        if item_rows:
            con.executemany("INSERT INTO evaluation_items VALUES (?, ?, ?, ?, ?)", item_rows)


def load_item_scores(store: Store, run_id: str) -> dict[str, dict[str, dict[int, float]]]:
    """benchmark -> metric -> item id -> value, for one stored run."""
    frame = store.read("SELECT benchmark, metric, item_id, value FROM evaluation_items WHERE run_id = ?", [run_id])
    if frame.is_empty():
        raise KtoLoopError(f"no evaluation items stored for run {run_id!r}; was it saved with save_run()?")
    out: dict[str, dict[str, dict[int, float]]] = {}
    for bench, metric, item, value in frame.iter_rows():
        out.setdefault(bench, {}).setdefault(metric, {})[item] = value
    return out


def latest_run_id(store: Store, model_id: str, suite: str) -> str | None:
    """The most recent stored run of a model on a suite (what a promotion gate compares against)."""
    return store.scalar("SELECT run_id FROM evaluations WHERE model_id = ? AND suite = ? "
                        "ORDER BY evaluated_at DESC LIMIT 1", [model_id, suite])
