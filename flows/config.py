"""The loop's sections, ``[dataset]`` (gates under ``[dataset.gates]``) and ``[flows]``.

Kept apart from the steps that use them, so every command validates them when it loads the file without
importing DuckDB, pyarrow or Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ktoloop.methods import GateConfig
from ktoloop.config import ConfigError


@dataclass(frozen=True)
class DatasetConfig:
    """How snapshots are built (TOML section ``[dataset]``; gates under ``[dataset.gates]``)."""

    holdout_fraction: float = 0.1
    """Share of prompts (not rows) held out for evaluation."""
    max_pairs_per_prompt: int = 4
    """So one popular prompt cannot dominate the pairwise set."""
    min_prompt_chars: int = 1
    min_response_chars: int = 1
    sources: list[str] = field(default_factory=list)
    """Only events from these sources (empty: all)."""
    max_class_weight: float = 10.0
    """Cap on the larger of the KTO class weights."""
    split_salt: str = "ktoloop"
    gates: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError(f"dataset.holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.max_pairs_per_prompt < 1:
            raise ConfigError("dataset.max_pairs_per_prompt must be >= 1")
        if self.max_class_weight < 4.0 / 3.0:
            raise ConfigError("dataset.max_class_weight must be >= 4/3 for the KTO weight rule to be satisfiable")


@dataclass(frozen=True)
class LoopConfig:
    """The ``[flows]`` section: what a retrain does and when the served deployments run."""

    suite: str = "quick"
    """Capability suite run on the candidate and the reference before promotion."""
    min_preference_gain: float = 0.0
    """The lower confidence bound of the held-out per-example gain over the serving model must exceed this."""
    confidence: float = 0.95
    """Confidence of that one-sided bound (``flows.gate.paired_test``)."""
    canary_events: int = 0
    """0: a candidate that passes the gate serves at once. N > 0: it first serves a share of traffic as a canary
    (exported and pinned under its own model_version, which production stamps on that share's feedback), and
    replaces the serving model only when, over at least N rated answers of each since the canary started, its
    thumbs-up rate is significantly higher (``flows.gate.proportion_test`` at ``confidence``)."""
    drain_before_retrain: bool = True
    drain_interval_s: int = 300
    monitor_interval_s: int = 3600
    retrain_cron: str = "0 2 * * *"
    """Nightly retrain (cron, server time zone)."""
    monitor_emit_event: bool = True
    """Emit ``kto.drift.detected`` when the monitor finds drift (starts a retrain through the trigger)."""
    drift_cooldown_s: int = 21_600
    """After emitting ``kto.drift.detected``, the monitor holds further ones this long (0: no cooldown), so
    drift that persists on unchanged data starts one retrain, not one per monitor run."""

    def __post_init__(self) -> None:
        if self.suite not in ("quick", "full"):
            raise ConfigError(f"flows.suite must be quick or full, got {self.suite!r}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"flows.confidence must be in [0.5, 1), got {self.confidence}")
        if self.canary_events < 0 or 0 < self.canary_events < 30:
            raise ConfigError(f"flows.canary_events must be 0 (no canary) or >= 30 (the z test's normal "
                              f"approximation), got {self.canary_events}")
        if min(self.drain_interval_s, self.monitor_interval_s) < 1:
            raise ConfigError("flows.*_interval_s must be >= 1")
        if self.drift_cooldown_s < 0:
            raise ConfigError(f"flows.drift_cooldown_s must be >= 0 (0: no cooldown), got {self.drift_cooldown_s}")
