"""Custom Evidently (0.7) metrics over count tables, where the presets do not fit.

The inputs are the drift count table (``period, scope, stat, key, count``; see ``monitoring.drift``) and the
evaluations table, not raw events: the tests are the same functions the drift finding uses, and a report
over a million events costs a few thousand rows. Metric parameters are plain strings, so dashboard panels
select series by them (``metric_labels={"stat": "label", "scope": "*"}``).
"""

from __future__ import annotations

from typing import Optional

import pandas as pd
from evidently import DataDefinition, Dataset
from evidently.core.metric_types import SingleValueCalculation, SingleValueMetric

from monitoring.stats import ks_test, two_proportion_test

COUNT_COLUMNS = ["scope", "stat"]
SCORE_COLUMNS = ["model_id", "benchmark", "metric"]


def count_dataset(frame: pd.DataFrame) -> Dataset:
    return Dataset.from_pandas(frame, data_definition=DataDefinition(categorical_columns=COUNT_COLUMNS,
                                                                     numerical_columns=["key", "count"]))


def score_dataset(frame: pd.DataFrame) -> Dataset:
    return Dataset.from_pandas(frame, data_definition=DataDefinition(categorical_columns=SCORE_COLUMNS,
                                                                     numerical_columns=["value", "n"]))


def _hist(data: Optional[Dataset], scope: str, stat: str) -> dict[int, float]:
    if data is None:
        return {}
    df = data.as_dataframe()
    rows = df[(df["scope"] == scope) & (df["stat"] == stat)]
    return {int(k): float(c) for k, c in zip(rows["key"], rows["count"], strict=True)}


def _share(hist: dict[int, float]) -> tuple[float, float]:
    return hist.get(1, 0.0), sum(hist.values())


STAT_NAMES = {"label": "thumbs-up rate", "rejected": "rejected share", "unseen_prompt": "unseen-prompt share",
              "prompt_length": "prompt length", "response_length": "response length"}
"""Plain words for each stat, used in display names (the HTML report) and the dashboard's legends."""


class FeedbackShare(SingleValueMetric):
    """Share of events with key 1 of a 0/1 stat: thumbs-up rate (``label``), ``unseen_prompt``, ``rejected``."""

    stat: str
    scope: str = "*"


class FeedbackShareCalculation(SingleValueCalculation[FeedbackShare]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        def value(data):
            hits, n = _share(_hist(data, self.metric.scope, self.metric.stat))
            return self.result(hits / n if n else float("nan"))

        return value(current_data), None if reference_data is None else value(reference_data)

    def display_name(self) -> str:
        return f"{STAT_NAMES[self.metric.stat].capitalize()} ({_scope(self.metric.scope)})"


class EventCount(SingleValueMetric):
    """How many rows of a stat were counted: every event (``key="any"``) or only those with key ``"1"``/``"0"``
    (``rejected``, key 1: the dead letters)."""

    stat: str
    scope: str = "*"
    key: str = "any"


class EventCountCalculation(SingleValueCalculation[EventCount]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        hist = _hist(current_data, self.metric.scope, self.metric.stat)
        return self.result(sum(hist.values()) if self.metric.key == "any" else hist.get(int(self.metric.key), 0.0)), None

    def display_name(self) -> str:
        which = "" if self.metric.key == "any" else f" with {self.metric.stat} = {self.metric.key}"
        return f"Events{which} ({_scope(self.metric.scope)})"


class ShareDriftPValue(SingleValueMetric):
    """Two-proportion z-test p-value of a 0/1 stat between reference (``baseline`` scope) and current."""

    stat: str
    scope: str = "*"
    baseline: str = "*"


class ShareDriftPValueCalculation(SingleValueCalculation[ShareDriftPValue]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        ref_hits, ref_n = _share(_hist(reference_data, self.metric.baseline, self.metric.stat))
        cur_hits, cur_n = _share(_hist(current_data, self.metric.scope, self.metric.stat))
        return self.result(two_proportion_test(ref_hits, ref_n, cur_hits, cur_n).p_value)

    def display_name(self) -> str:
        return f"Drift p-value of the {STAT_NAMES[self.metric.stat]}, two-proportion z-test ({_scope(self.metric.scope)})"


class DistributionDriftPValue(SingleValueMetric):
    """Kolmogorov-Smirnov p-value of a histogram stat (``prompt_length``, ``response_length``)."""

    stat: str
    scope: str = "*"
    baseline: str = "*"


class DistributionDriftPValueCalculation(SingleValueCalculation[DistributionDriftPValue]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        ref = _hist(reference_data, self.metric.baseline, self.metric.stat)
        return self.result(ks_test(ref, _hist(current_data, self.metric.scope, self.metric.stat)).p_value)

    def display_name(self) -> str:
        return f"Drift p-value of the {STAT_NAMES[self.metric.stat]}, Kolmogorov-Smirnov ({_scope(self.metric.scope)})"


class DriftDetected(SingleValueMetric):
    """1 when test ``test`` of the drift finding is drift, else 0: its statistic recomputed from the counts and
    judged by ``monitoring.drift.is_drift`` with these thresholds (the ``[monitoring]`` section's), so the
    report's test and the finding apply one rule."""

    test: str
    """A ``DriftTest.name``: thumbs_up_rate, prompt_length, response_length, unseen_prompt_share, rejection_rate."""
    stat: str
    scope: str = "*"
    baseline: str = "*"
    alpha: float
    min_rate_change: float
    min_ks_distance: float
    max_unseen_prompt_share: float


class DriftDetectedCalculation(SingleValueCalculation[DriftDetected]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        from monitoring.config import MonitorConfig
        from monitoring.drift import LENGTH_TESTS, is_drift

        m = self.metric
        ref, cur = _hist(reference_data, m.baseline, m.stat), _hist(current_data, m.scope, m.stat)
        if m.test in LENGTH_TESTS:
            sig = ks_test(ref, cur)
        else:
            sig = two_proportion_test(*_share(ref), *_share(cur))
        hits, n = _share(cur)
        config = MonitorConfig(alpha=m.alpha, min_rate_change=m.min_rate_change, min_ks_distance=m.min_ks_distance,
                               max_unseen_prompt_share=m.max_unseen_prompt_share)
        return self.result(float(is_drift(m.test, sig, hits / n if n else float("nan"), config)))

    def display_name(self) -> str:
        return f"Drift of the {STAT_NAMES[self.metric.stat]} ({_scope(self.metric.scope)}): 1 = drift, 0 = none"


class BenchmarkScore(SingleValueMetric):
    """One capability score of the evaluated model (rows of the ``evaluations`` table)."""

    benchmark: str
    metric: str
    model: str = ""
    """What the dashboard's legend calls the model: ``reference`` or the candidate's model id."""


class BenchmarkScoreCalculation(SingleValueCalculation[BenchmarkScore]):
    def calculate(self, context, current_data: Dataset, reference_data: Optional[Dataset]):
        df = current_data.as_dataframe()
        rows = df[(df["benchmark"] == self.metric.benchmark) & (df["metric"] == self.metric.metric)]
        return self.result(float(rows["value"].iloc[0]) if len(rows) else float("nan")), None

    def display_name(self) -> str:
        return f"{self.metric.benchmark} {self.metric.metric} of {self.metric.model}"


def _scope(scope: str) -> str:
    if scope == "*":
        return "all model versions"
    return scope if scope.endswith(" window") else f"model version {scope}"

