"""Capability regression check: a candidate against a reference on the same items, per benchmark.

Non-inferiority, so the burden of proof is on the candidate: a benchmark passes only when the one-sided
upper confidence bound (paired t, ``monitoring.confidence``) of the candidate's drop in its primary metric is
below the benchmark's tolerance. Both models answered the same items, so the pairing removes item difficulty
from the noise; the t quantile keeps small samples (3 WikiText articles) honest. An unmeasurable drop (fewer
than two items) fails. ``benchmarks/bench_capability_power.py`` measures the test's power at the suite's sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from scipy import stats

from ktoloop.errors import KtoLoopError
from ktoloop.store import Store
from monitoring.config import MonitorConfig
from monitoring.harness import load_item_scores
from monitoring.tasks import get_task

ItemScores = Mapping[int, float]


@dataclass(frozen=True)
class BenchmarkCheck:
    benchmark: str
    metric: str
    n: int
    """Items both runs scored."""
    reference: float
    candidate: float
    drop: float
    """How much worse the candidate is, in the metric's units (negative = better)."""
    stderr: float | None
    """Paired standard error of the per-item difference (None when fewer than two items)."""
    upper_bound: float
    """One-sided upper confidence bound of the drop (infinite when it cannot be measured)."""
    tolerance: float
    sampled: bool
    passed: bool

    def describe(self) -> str:
        se = "n/a" if self.stderr is None else f"{self.stderr:.3f}"
        verdict = "ok" if self.passed else "REGRESSION"
        return (f"{self.benchmark}.{self.metric} {self.reference:.3f} -> {self.candidate:.3f}: drop {self.drop:+.3f} "
                f"± {se}, upper bound {self.upper_bound:+.3f} {'<' if self.passed else '>='} tolerance "
                f"{self.tolerance:.3f} (n={self.n}{', sample' if self.sampled else ''}) -> {verdict}")


@dataclass(frozen=True)
class RegressionResult:
    passed: bool
    checks: list[BenchmarkCheck]
    problems: list[str] = field(default_factory=list)
    """Benchmarks that could not be compared (missing from a run, no common items): these fail the check."""

    @property
    def failures(self) -> list[BenchmarkCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        head = "capability check passed" if self.passed else "capability check FAILED"
        return "\n".join([head, *(c.describe() for c in self.checks), *self.problems])


def paired_check(benchmark: str, metric: str, reference: ItemScores, candidate: ItemScores, *, tolerance: float,
                 sampled: bool, confidence: float = 0.95, higher_is_better: bool = True) -> BenchmarkCheck:
    """Compare two runs on the items both scored (see the module docstring)."""
    common = sorted(set(reference) & set(candidate))
    if not common:
        raise KtoLoopError(f"{benchmark}: the candidate and reference runs share no items; "
                           "run both with the same suite and seed")
    sign = 1.0 if higher_is_better else -1.0
    drops = [sign * (reference[i] - candidate[i]) for i in common]
    n = len(common)
    drop = sum(drops) / n
    stderr, upper = None, math.inf
    if n > 1:
        stderr = math.sqrt(sum((d - drop) ** 2 for d in drops) / (n - 1) / n)
        upper = drop + float(stats.t.ppf(confidence, n - 1)) * stderr
    return BenchmarkCheck(benchmark, metric, n, sum(reference[i] for i in common) / n,
                          sum(candidate[i] for i in common) / n, drop, stderr, upper, tolerance, sampled,
                          passed=upper < tolerance)


def compare(reference: Mapping[str, Mapping[str, ItemScores]], candidate: Mapping[str, Mapping[str, ItemScores]],
            *, sampled: bool, config: MonitorConfig | None = None) -> RegressionResult:
    """Check every benchmark of the reference; inputs are benchmark -> metric -> item id -> value."""
    config = config or MonitorConfig()
    checks, problems = [], []
    for name, metrics in reference.items():
        task = get_task(name)
        if name not in candidate or task.primary not in candidate[name]:
            problems.append(f"{name}: missing from the candidate run")
            continue
        if task.primary not in metrics:
            problems.append(f"{name}: reference run has no per-item {task.primary}")
            continue
        try:
            checks.append(paired_check(name, task.primary, metrics[task.primary], candidate[name][task.primary],
                                       tolerance=config.tolerance_for(name), sampled=sampled,
                                       confidence=config.confidence,
                                       higher_is_better=task.higher_is_better))
        except KtoLoopError as exc:
            problems.append(str(exc))
    return RegressionResult(not problems and all(c.passed for c in checks), checks, problems)


def check_regression(store: Store, candidate_run_id: str, reference_run_id: str,
                     config: MonitorConfig | None = None) -> RegressionResult:
    """The promotion gate: compare two stored runs (see ``harness.run_suite``)."""
    suites = store.read("SELECT DISTINCT run_id, suite FROM evaluations WHERE run_id IN (?, ?)",
                        [candidate_run_id, reference_run_id])
    sampled = any(s != "full" for s in suites["suite"].to_list())
    return compare(load_item_scores(store, reference_run_id), load_item_scores(store, candidate_run_id),
                   sampled=sampled, config=config)
