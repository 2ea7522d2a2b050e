"""The ``[monitoring]`` section: one typed source of defaults for evaluation, regression and drift."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ktoloop import data
from ktoloop.config import PATH, ConfigError, Settings, load_section


@dataclass(frozen=True)
class MonitorConfig:
    benchmarks_dir: str = field(default="", metadata=PATH)
    """Folder with the benchmark files (formats: ktoloop/data/PROVENANCE.md); empty means ``<data_dir>/benchmarks``."""
    batch_tokens: int = 2048
    """Padded tokens per forward pass. Rows are sorted by length, yet each is padded to its batch's longest: on
    2 CPU cores, a row per request, the demo's ARC-Easy and PIQA took 78 s at 2,048 against 114 s at 8,192
    (``benchmarks/bench_eval.py --packing``)."""
    max_length: int = 2048
    """Longest sequence scored (contexts are truncated from the left); also the perplexity window."""
    quick_sizes: dict[str, int] = field(default_factory=lambda: {
        "arc_easy": 150, "hellaswag": 80, "piqa": 120, "winogrande": 150, "lambada": 150, "wikitext2": 3,
    })
    """Items per benchmark in the quick suite (a fixed, seeded sample); benchmarks not named are skipped.

    Sized for about 2.5 min on 2 CPU cores for SmolLM2-135M (measured in benchmarks/bench_eval.py)."""
    full_benchmarks: list[str] = field(default_factory=lambda: [
        "arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada", "wikitext2",
    ])
    seed: int = 1234
    """Seed of the quick-suite sample: the same seed gives the same items, so runs are comparable."""
    tolerance: float = 0.04
    """Largest drop of a benchmark's primary metric the gate accepts, in its own units (0.04 = 4 points of
    accuracy): the upper confidence bound of the paired drop must stay below it (non-inferiority). At 0.04 a
    true 5-point drop passes at most ~5% of the time at any sample size (benchmarks/bench_capability_power.py)."""
    tolerances: dict[str, float] = field(default_factory=lambda: {"wikitext2": 0.02})
    """Per-benchmark overrides of ``tolerance`` (WikiText-2: bits per byte)."""
    confidence: float = 0.95
    """Confidence of the one-sided upper bound of each benchmark's paired drop."""
    alpha: float = 0.01
    """Significance level of the drift tests."""
    min_rate_change: float = 0.02
    """A thumbs-up rate must also move this much (absolute) to be called drift (a rejection rate: any
    significant rise). One rule for the finding and the report: ``monitoring.drift.is_drift``."""
    min_ks_distance: float = 0.05
    """A length distribution must also move this far (Kolmogorov-Smirnov D) to be called drift."""
    min_rows: int = 200
    """Windows (or model versions) with fewer rows than this are reported but not tested."""
    max_unseen_prompt_share: float = 1.0
    """Flag drift when more than this share of current prompts never appeared before (1.0 = never flag)."""
    window_days: float = 7.0
    """Default window length when ``monitor report`` is given no windows."""
    bucket_hours: float = 24.0
    """The dashboard's time step (24 = one point a day): feedback by event time, dead letters by receipt time."""
    dashboard_buckets: int = 120
    """Each report refreshes the newest this many buckets in the workspace; older ones stay as logged."""

    def __post_init__(self) -> None:
        if self.batch_tokens < 64:
            raise ConfigError(f"monitoring.batch_tokens must be >= 64, got {self.batch_tokens}")
        if self.max_length < 16:
            raise ConfigError(f"monitoring.max_length must be >= 16, got {self.max_length}")
        for name, size in self.quick_sizes.items():
            if size < 1:
                raise ConfigError(f"monitoring.quick_sizes.{name} must be >= 1, got {size}")
        for name, value in {"tolerance": self.tolerance, **{f"tolerances.{k}": v for k, v in self.tolerances.items()},
                            "min_rate_change": self.min_rate_change,
                            "min_ks_distance": self.min_ks_distance}.items():
            if value < 0:
                raise ConfigError(f"monitoring.{name} must be >= 0, got {value}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"monitoring.confidence must be in [0.5, 1), got {self.confidence}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"monitoring.alpha must be in (0, 1), got {self.alpha}")
        if not 0 <= self.max_unseen_prompt_share <= 1:
            raise ConfigError(f"monitoring.max_unseen_prompt_share must be in [0, 1], got {self.max_unseen_prompt_share}")
        if self.window_days <= 0:
            raise ConfigError(f"monitoring.window_days must be > 0, got {self.window_days}")
        if not 1 / 60 <= self.bucket_hours <= 24 * 31:
            raise ConfigError(f"monitoring.bucket_hours must be between 1/60 (a minute) and 744 (31 days), "
                              f"got {self.bucket_hours}")
        if self.dashboard_buckets < 1:
            raise ConfigError(f"monitoring.dashboard_buckets must be >= 1, got {self.dashboard_buckets}")

    def tolerance_for(self, benchmark: str) -> float:
        return self.tolerances.get(benchmark, self.tolerance)

    @property
    def benchmarks_path(self) -> Path:
        """Built without settings (tests, notebooks), an empty ``benchmarks_dir`` means the packaged copy."""
        if self.benchmarks_dir:
            return Path(self.benchmarks_dir).expanduser().resolve()
        return data.packaged_dir() / data.BENCHMARKS


def load_monitor_config(settings: Settings) -> MonitorConfig:
    """The ``[monitoring]`` section, with an unset ``benchmarks_dir`` derived from the top-level ``data_dir``."""
    config = load_section(settings, "monitoring", MonitorConfig)
    if not config.benchmarks_dir:
        config = dataclasses.replace(config, benchmarks_dir=str(settings.data_path / data.BENCHMARKS))
    return config


def monitoring_dir(settings: Settings) -> Path:
    """Reports and the Evidently workspace live here."""
    return settings.home_dir / "monitoring"
