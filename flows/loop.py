"""The loop's steps as plain functions: drain, build, train, evaluate, gate, monitor.

The Prefect flows (``flows.prefect_flows``, which also orchestrate the retrain) and the CLI both call these,
so there is one implementation of each step. Every step is idempotent on its inputs: a re-run with the same snapshot reuses the cached
reference log-probs, an existing candidate and its stored evaluation instead of redoing them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import registry
from flows.dataset import BuildResult, DatasetConfig, build_dataset
from flows.gate import Gate, paired_test, verdict
from ktoloop.config import ConfigError, Settings, load_section
from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot, load_snapshot
from ktoloop.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    """The ``[flows]`` section: what a retrain does and when the served deployments run."""

    suite: str = "quick"
    """Capability suite run on the candidate and the reference before promotion."""
    min_preference_gain: float = 0.0
    """The lower confidence bound of the held-out per-example gain over the serving model must exceed this."""
    confidence: float = 0.95
    """Confidence of that one-sided bound (``flows.gate.paired_test``)."""
    drain_before_retrain: bool = True
    drain_interval_s: int = 300
    monitor_interval_s: int = 3600
    retrain_cron: str = "0 2 * * *"
    """Nightly retrain (cron, server time zone)."""
    monitor_emit_event: bool = True
    """Emit ``kto.drift.detected`` when the monitor finds drift (starts a retrain through the trigger)."""

    def __post_init__(self) -> None:
        if self.suite not in ("quick", "full"):
            raise ConfigError(f"flows.suite must be quick or full, got {self.suite!r}")
        if not 0.5 <= self.confidence < 1:
            raise ConfigError(f"flows.confidence must be in [0.5, 1), got {self.confidence}")
        if min(self.drain_interval_s, self.monitor_interval_s) < 1:
            raise ConfigError("flows.*_interval_s must be >= 1")


@dataclass(frozen=True)
class RetrainOutcome:
    status: str
    """promoted | rejected | skipped (not enough data or no eligible method)"""
    reason: str
    trigger: str
    snapshot_id: str | None = None
    model_id: str | None = None
    gate: dict[str, Any] | None = None
    decision: dict[str, Any] = field(default_factory=dict)


def store_of(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


# --- the steps ------------------------------------------------------------------------------------------

def drain(settings: Settings) -> dict[str, Any]:
    """Land everything the topic holds now (ingest until the group's lag is 0)."""
    from ingest.consumer import FeedbackIngestor

    stats = FeedbackIngestor(settings, store_of(settings)).drain()
    return dataclasses.asdict(stats)


def build(settings: Settings, *, model_version: str | None = None, method: str | None = None) -> BuildResult:
    """Snapshot the pinned reference's feedback and decide the method (PPO sees whether a reward model exists)."""
    from flows.cli import resolve_model_version

    version = resolve_model_version(settings.home_dir, model_version)
    config = load_section(settings, "dataset", DatasetConfig)
    return build_dataset(store_of(settings), settings.home_dir, config, version, force_method=method,
                         reward_model=_has_reward_model(settings, version))


def _has_reward_model(settings: Settings, model_version: str) -> bool:
    try:
        from training.reference import reference_for_snapshot
        from training.reward import reward_model_for
    except ImportError:  # the reward-model stage is optional
        return False
    return reward_model_for(reference_for_snapshot(model_version, settings.home_dir), settings.home_dir) is not None


@dataclass(frozen=True)
class TrainedRun:
    config: dict[str, Any]
    fingerprint: str
    metrics: dict[str, Any]
    """Held-out preference score on the snapshot's eval split (PreferenceScore as a dict)."""


def _train_offline(settings: Settings, snapshot: Snapshot, reference, method: str, out_dir: Path | None):
    from training.config import TrainConfig
    from training.trainer import train

    config = dataclasses.replace(load_section(settings, "training", TrainConfig), method=method)
    if out_dir is None:
        return config.fingerprint()
    result = train(config, snapshot, reference, out_dir, cache_dir=settings.home_dir / "cache", resume=True)
    return TrainedRun(config.to_dict(), config.fingerprint(), result.eval or {})


def _train_ppo(settings: Settings, snapshot: Snapshot, reference, method: str, out_dir: Path | None):
    """PPO within the gates' token budget, against the reward model pinned for this reference."""
    from training.ppo import PPOConfig, train_ppo
    from training.reward import reward_model_for

    gates = load_section(settings, "dataset", DatasetConfig).gates
    config = load_section(settings, "ppo", PPOConfig)
    if gates.ppo_budget_tokens:
        config = dataclasses.replace(config, max_generated_tokens=gates.ppo_budget_tokens)
    if out_dir is None:
        return config.fingerprint()
    result = train_ppo(config, snapshot, reference, out_dir, reward_model_for(reference, settings.home_dir),
                       cache_dir=settings.home_dir / "cache", resume=True)
    metrics = dict(result.eval or {})
    if result.stop.get("guard"):  # KL bound or reward hacking: flagged, never promotable
        metrics["guard_stop"] = result.stop
    return TrainedRun(config.to_dict(), config.fingerprint(), metrics)


# method -> trainer(settings, snapshot, reference, method, out_dir) (out_dir None: just the config fingerprint)
TRAINERS = {"kto": _train_offline, "dpo": _train_offline, "ipo": _train_offline, "ppo": _train_ppo}


def train_candidate(settings: Settings, snapshot_id: str, method: str) -> registry.Candidate:
    """Train (or reuse) the candidate for this snapshot, method and config; register it."""
    from training.config import TrainConfig
    from training.reference import reference_for_snapshot

    snapshot = load_snapshot(snapshot_id, settings.home_dir)
    reference = reference_for_snapshot(snapshot.manifest.model_version, settings.home_dir,
                                       load_section(settings, "training", TrainConfig).reference)
    trainer = TRAINERS[method]
    model_id = f"{method}-{snapshot.manifest.snapshot_id}-{trainer(settings, snapshot, reference, method, None)}"
    store = store_of(settings)
    existing = registry.find(store, model_id)
    if existing is not None:
        log.info("reusing candidate %s (same snapshot and config)", model_id)
        return existing
    out_dir = settings.home_dir / "models" / model_id
    run = trainer(settings, snapshot, reference, method, out_dir)
    return registry.register(store, registry.Candidate(
        model_id=model_id, method=method, snapshot_id=snapshot.manifest.snapshot_id,
        snapshot_sha256=snapshot.manifest.content_sha256, reference_name=reference.name,
        reference_sha256=reference.sha256, model_version=reference.model_version, adapter_path=str(out_dir),
        config=run.config, metrics=run.metrics, evaluation=None, status="candidate"))


def _model_dirs(reference_path: str, candidate: registry.Candidate | None) -> tuple[str, str | None]:
    """(base, adapter) for a candidate: LoRA adapters sit on the reference, full fine-tunes stand alone."""
    if candidate is None:
        return reference_path, None
    if candidate.config.get("full_finetune"):
        return candidate.adapter_path, None
    return reference_path, candidate.adapter_path


def capability_run(settings: Settings, reference, candidate: registry.Candidate | None) -> str:
    """Run (or reuse) the capability suite on the reference or a candidate and log it to the Evidently
    workspace (the dashboard's capability panels); returns the stored run id."""
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.harness import latest_run_id, run_suite
    from monitoring.reports import log_evaluation

    loop = load_section(settings, "flows", LoopConfig)
    config, store = load_monitor_config(settings), store_of(settings)
    model_id = candidate.model_id if candidate else f"reference:{reference.name}:{reference.sha256[:12]}"
    run_id = latest_run_id(store, model_id, loop.suite)
    if run_id is None:
        base, adapter = _model_dirs(reference.path, candidate)
        run_id = run_suite(base, adapter, suite=loop.suite, config=config, store=store, model_id=model_id).run_id
    log_evaluation(store, monitoring_dir(settings) / "workspace", run_id, config)  # a reused run too: same id
    return run_id


def heldout_preference(settings: Settings, snapshot: Snapshot, reference, candidate: registry.Candidate | None,
                       method_config) -> dict[str, Any]:
    """Held-out preference score (with per-example scores) of the reference (candidate=None) or a candidate."""
    from training.evaluate import evaluate_preference, reference_score
    from training.modeling import load_model

    if candidate is None:
        return dataclasses.asdict(reference_score(snapshot, method_config))
    base, adapter = _model_dirs(reference.path, candidate)
    model, tokenizer = load_model(base, adapter)
    score = evaluate_preference(model, tokenizer, snapshot, reference, method_config,
                                cache_dir=settings.home_dir / "cache")
    return dataclasses.asdict(score)


def evaluate_candidate(settings: Settings, model_id: str) -> Gate:
    """The promotion gate (``flows.gate``) against the model serving now, on the candidate's own snapshot: a
    significant held-out preference gain over it, and no capability regression vs the reference. A stored
    verdict is reused only while the model it was reached against still serves."""
    from monitoring.config import load_monitor_config
    from monitoring.regression import check_regression
    from training.config import TrainConfig
    from training.reference import reference_for_snapshot

    store = store_of(settings)
    loop = load_section(settings, "flows", LoopConfig)
    candidate = registry.get(store, model_id)
    incumbent = registry.promoted(store)
    if incumbent is not None and incumbent.model_version != candidate.model_version:
        incumbent = None  # another reference's model is not comparable on this snapshot
    incumbent_id = incumbent.model_id if incumbent else None
    stored = candidate.evaluation
    serving = incumbent is not None and incumbent.model_id == candidate.model_id
    if stored is not None and "incumbent_id" in stored and (serving or stored["incumbent_id"] == incumbent_id):
        return Gate(**stored)  # the verdict about the model serving now (or the one that promoted it)
    snapshot = load_snapshot(candidate.snapshot_id, settings.home_dir)
    reference = reference_for_snapshot(candidate.model_version, settings.home_dir, candidate.reference_name)

    capability = check_regression(store, capability_run(settings, reference, candidate),
                                  capability_run(settings, reference, None), load_monitor_config(settings))
    # every model is scored in the snapshot's one held-out form (training.evaluate.heldout_method)
    offline = load_section(settings, "training", TrainConfig)
    mine = candidate.metrics
    config = dataclasses.replace(offline, method=mine.get("method", offline.method), beta=mine.get("beta", offline.beta))
    from training.evaluate import heldout_method

    if heldout_method(snapshot, config.method) is None:
        raise KtoLoopError(f"snapshot {candidate.snapshot_id} has no held-out split to gate {model_id} on; "
                           f"raise dataset.holdout_fraction")
    if "scores" not in mine:  # registered before per-example scores were kept
        mine = {**heldout_preference(settings, snapshot, reference, candidate, config),
                **({"guard_stop": mine["guard_stop"]} if "guard_stop" in mine else {})}
    theirs = heldout_preference(settings, snapshot, reference, incumbent, config)
    test = paired_test(mine["scores"], theirs["scores"], form=mine.get("form", "pairs"),
                       min_gain=loop.min_preference_gain, confidence=loop.confidence)
    gate = verdict(test, capability, incumbent_id, incumbent_id or "the reference", mine.get("guard_stop"))
    registry.set_evaluation(store, model_id, gate.to_dict(), "evaluated")
    return gate


def promote_if_passing(settings: Settings, model_id: str, gate: Gate, *, actor: str = "retrain-flow") -> bool:
    """Point serving at ``model_id`` if ``gate`` (from ``evaluate_candidate``, so about the model serving now)
    passed; else record the rejection. A model already serving stays, whatever a re-run says."""
    store = store_of(settings)
    current = registry.promoted(store)
    if current is not None and current.model_id == model_id:
        return True  # a re-run of the same retrain: already serving
    if gate.passed:
        registry.promote(store, model_id, gate=gate.to_dict(), actor=actor, reason="passed the gate")
        return True
    registry.set_evaluation(store, model_id, gate.to_dict(), "rejected")
    return False


def monitor(settings: Settings):
    """Drift report + workspace update; returns the ``DriftReport`` (its ``finding`` says whether to retrain)."""
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.reports import drift_report

    out = monitoring_dir(settings)
    return drift_report(store_of(settings), out / "reports", config=load_monitor_config(settings),
                        workspace=out / "workspace")
