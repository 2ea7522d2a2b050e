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
    """The held-out preference loss must be lower than the incumbent's by more than this."""
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
        if min(self.drain_interval_s, self.monitor_interval_s) < 1:
            raise ConfigError("flows.*_interval_s must be >= 1")


@dataclass(frozen=True)
class Gate:
    passed: bool
    summary: str
    capability: dict[str, Any]
    preference: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
    """Run (or reuse) the capability suite on the reference or a candidate; returns the stored run id."""
    from monitoring.config import load_monitor_config
    from monitoring.harness import latest_run_id, run_suite

    loop = load_section(settings, "flows", LoopConfig)
    store = store_of(settings)
    model_id = candidate.model_id if candidate else f"reference:{reference.name}:{reference.sha256[:12]}"
    existing = latest_run_id(store, model_id, loop.suite)
    if existing is not None:
        return existing
    base, adapter = _model_dirs(reference.path, candidate)
    run = run_suite(base, adapter, suite=loop.suite, config=load_monitor_config(settings), store=store,
                    model_id=model_id)
    return run.run_id


def heldout_preference(settings: Settings, snapshot: Snapshot, reference, candidate: registry.Candidate | None,
                       method_config) -> dict[str, Any]:
    """Held-out preference score of the reference (candidate=None) or a candidate on this snapshot."""
    from training.evaluate import evaluate_preference
    from training.modeling import load_model

    if candidate is None:
        return reference_preference(snapshot, method_config)
    base, adapter = _model_dirs(reference.path, candidate)
    model, tokenizer = load_model(base, adapter)
    score = evaluate_preference(model, tokenizer, snapshot, reference, method_config,
                                cache_dir=settings.home_dir / "cache")
    return dataclasses.asdict(score)


def reference_preference(snapshot: Snapshot, method_config) -> dict[str, Any]:
    """The reference scored as a policy: its log-ratio to itself is exactly 0 for every completion, so the
    loss is the method's loss at 0 and no completion is ranked right. Computed in closed form: running the
    model would only add floating-point noise around these values (and minutes of CPU)."""
    import torch

    from training.losses import LOSSES, BatchInfo

    method = LOSSES[method_config.method]
    if method.paired:
        n = snapshot.pairs("eval").height
        info = BatchInfo(lengths=torch.ones(2 * n))
        zeros = torch.zeros(2 * n)
    else:
        labels = snapshot.kto("eval")["label"].to_list()
        n = len(labels)
        weights = snapshot.manifest.kto_weights or {}
        info = BatchInfo(lengths=torch.ones(n), desirable=torch.tensor(labels, dtype=torch.bool),
                         kl_policy_logps=torch.zeros(max(n, 1)), kl_reference_logps=torch.zeros(max(n, 1)),
                         desirable_weight=float(weights.get("desirable", 1.0)),
                         undesirable_weight=float(weights.get("undesirable", 1.0)))
        zeros = torch.zeros(n)
    out = method.loss(zeros, zeros, info, method_config.beta)
    return {"split": "eval", "method": method_config.method, "beta": method_config.beta, "examples": n,
            "loss": out.losses.mean().item() if n else 0.0, "accuracy": out.correct.float().mean().item() if n else 0.0,
            "reward_chosen": 0.0, "reward_rejected": 0.0, "reward_margin": 0.0, "kl": 0.0}


def evaluate_candidate(settings: Settings, model_id: str) -> Gate:
    """The promotion gate: no capability regression vs the reference, and a lower held-out preference loss
    than the promoted model's (or the reference's when none is promoted), on the candidate's own snapshot."""
    from monitoring.config import load_monitor_config
    from monitoring.regression import check_regression
    from training.config import TrainConfig
    from training.reference import reference_for_snapshot

    store = store_of(settings)
    loop = load_section(settings, "flows", LoopConfig)
    candidate = registry.get(store, model_id)
    if candidate.evaluation is not None:
        return Gate(**candidate.evaluation)
    snapshot = load_snapshot(candidate.snapshot_id, settings.home_dir)
    reference = reference_for_snapshot(candidate.model_version, settings.home_dir, candidate.reference_name)

    capability = check_regression(store, capability_run(settings, reference, candidate),
                                  capability_run(settings, reference, None), load_monitor_config(settings))
    mine = candidate.metrics
    if "accuracy" not in mine:
        raise KtoLoopError(f"{model_id} has no held-out preference score (empty eval split in "
                           f"{candidate.snapshot_id}?); raise dataset.holdout_fraction")
    # score everyone with the candidate's preference loss and beta (PPO candidates report a DPO/KTO score)
    offline = load_section(settings, "training", TrainConfig)
    config = dataclasses.replace(offline, method=mine.get("method", offline.method), beta=mine.get("beta", offline.beta))
    incumbent = registry.promoted(store)
    if incumbent is not None and incumbent.model_version != candidate.model_version:
        incumbent = None  # another reference's model is not comparable on this snapshot
    theirs = heldout_preference(settings, snapshot, reference, incumbent, config)
    # the preference metric is the method's own loss on held-out prompts (lower is better); reward accuracy
    # is reported but not gated on: the reference ties every completion, so any perturbation "beats" it
    gain = theirs["loss"] - mine["loss"]
    preference_ok = gain > loop.min_preference_gain and "guard_stop" not in mine
    versus = incumbent.model_id if incumbent else "the reference"
    summary = (f"capability {'ok' if capability.passed else 'REGRESSION'}: "
               + "; ".join(c.describe() for c in capability.failures or capability.checks[:3])
               + f" | held-out {config.method} loss {mine['loss']:.4f} vs {theirs['loss']:.4f} ({versus}): "
               f"{'improved' if preference_ok else 'NOT improved'} by {gain:+.4f} "
               f"(reward accuracy {mine['accuracy']:.3f} vs {theirs['accuracy']:.3f})")
    gate = Gate(
        passed=capability.passed and preference_ok, summary=summary,
        capability={"passed": capability.passed, "checks": [dataclasses.asdict(c) for c in capability.checks],
                    "problems": capability.problems},
        preference={"candidate": mine, "incumbent": theirs, "incumbent_id": incumbent.model_id if incumbent else None,
                    "gain": gain, "min_gain": loop.min_preference_gain, "passed": preference_ok},
    )
    registry.set_evaluation(store, model_id, gate.to_dict(), "evaluated")
    return gate


def promote_if_passing(settings: Settings, model_id: str, gate: Gate) -> bool:
    store = store_of(settings)
    current = registry.promoted(store)
    if gate.passed and current is not None and current.model_id == model_id:
        return True  # a re-run of the same retrain: already serving
    if gate.passed:
        registry.promote(store, model_id, gate=gate.to_dict(), actor="retrain-flow", reason="passed the gate")
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
