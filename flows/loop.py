"""The loop's steps as plain functions: drain, build, decide, train, evaluate, gate, promote, monitor.

The Prefect flows (``flows.prefect_flows``, which also orchestrate the retrain) and the CLI both call these,
so there is one implementation of each step. Every step is idempotent on its inputs: a re-run with the same snapshot reuses the cached
reference log-probs, an existing candidate and its stored evaluation instead of redoing them.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows import lineage, registry
from flows.config import LoopConfig  # the [flows] section lives there: loading it needs no Prefect
from flows.dataset import BuildResult, DatasetConfig, build_dataset, record_decision
from flows.gate import Gate, paired_test, proportion_test, verdict
from ktoloop.config import Settings, load_section
from ktoloop.decision import Decision, decide_snapshot
from ktoloop.errors import KtoLoopError
from ktoloop.methods import METHODS
from ktoloop.snapshot import Snapshot, load_snapshot
from ktoloop.store import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainOutcome:
    status: str
    """promoted | canary (passed the gate, serves a share of traffic first) | rejected | canary-pending (a
    canary awaits its live verdict: nothing new is trained) | skipped (not enough data or no eligible method)"""
    reason: str
    trigger: str
    snapshot_id: str | None = None
    model_id: str | None = None
    gate: dict[str, Any] | None = None
    decision: dict[str, Any] = field(default_factory=dict)
    already_decided: bool = False
    """The snapshot, method and config had a standing verdict: nothing was trained or judged again."""
    canary: dict[str, Any] | None = None
    """The live verdict on the pending canary (``CanaryVerdict``), reached first in this run."""


def store_of(settings: Settings) -> Store:
    return Store(settings.db_path, settings.store.lock_timeout_s)


# --- the steps ------------------------------------------------------------------------------------------

def drain(settings: Settings) -> dict[str, Any]:
    """Land everything the topic holds now (ingest until the group's lag is 0)."""
    from ingest.consumer import FeedbackIngestor

    stats = FeedbackIngestor(settings, store_of(settings)).drain()
    return dataclasses.asdict(stats)


def build(settings: Settings, *, model_version: str | None = None, method: str | None = None,
          since: dt.datetime | None = None, until: dt.datetime | None = None,
          holdout: float | None = None) -> BuildResult:
    """Snapshot the serving model's feedback (or ``model_version``'s) in [since, until) and decide the method
    (PPO sees whether a reward model exists). ``holdout`` overrides ``dataset.holdout_fraction``."""
    version = lineage.resolve_model_version(settings, store_of(settings), model_version)
    config = load_section(settings, "dataset", DatasetConfig)
    if holdout is not None:
        config = dataclasses.replace(config, holdout_fraction=holdout)
    return build_dataset(store_of(settings), settings.home_dir, config, version, since=since, until=until,
                         force_method=method, reward_model=_has_reward_model(settings, version))


def decide(settings: Settings, snapshot_id: str, method: str | None = None, *, record: bool = True) -> Decision:
    """The method decision about a snapshot (its id, or its directory) under this config's rules
    (``[dataset.gates]``, a forced ``method``, whether a reward model exists), recorded in the ``decisions``
    table unless ``record`` is False; the same decision ``build`` reaches."""
    snapshot = load_snapshot(snapshot_id, settings.home_dir)
    gates = load_section(settings, "dataset", DatasetConfig).gates
    decision = decide_snapshot(snapshot.manifest.snapshot_id, snapshot.manifest.counts, gates, method,
                               _has_reward_model(settings, snapshot.manifest.model_version))
    if record:
        record_decision(store_of(settings), decision)
    return decision


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


@dataclass(frozen=True)
class Trainer:
    """How the loop trains one kind of method: its resolved config (whose fingerprint names the candidate) and
    the run. Chosen by ``ktoloop.methods.METHODS[name].online``."""

    config: Callable[[Settings, str], Any]
    run: Callable[[Settings, Any, Snapshot, Any, Path, Decision, "str | None", bool], TrainedRun]
    """(settings, config, snapshot, reference, out_dir, decision, override reason, resume) -> the run"""


def _offline_config(settings: Settings, method: str):
    from training.config import TrainConfig

    return dataclasses.replace(load_section(settings, "training", TrainConfig), method=method)


def _offline_run(settings: Settings, config, snapshot: Snapshot, reference, out_dir: Path, decision: Decision,
                 override: str | None, resume: bool) -> TrainedRun:
    from training.trainer import train

    result = train(config, snapshot, reference, out_dir, decision=decision, cache_dir=settings.home_dir / "cache",
                   resume=resume, override=override)
    return TrainedRun(config.to_dict(), config.fingerprint(), result.eval or {})


def _ppo_config(settings: Settings, method: str):
    """``[ppo]`` within the gates' token budget."""
    from training.config import PPOConfig

    gates = load_section(settings, "dataset", DatasetConfig).gates
    config = load_section(settings, "ppo", PPOConfig)
    if gates.ppo_budget_tokens:
        config = dataclasses.replace(config, max_generated_tokens=gates.ppo_budget_tokens)
    return config


def _ppo_run(settings: Settings, config, snapshot: Snapshot, reference, out_dir: Path, decision: Decision,
             override: str | None, resume: bool) -> TrainedRun:
    """PPO against the reward model pinned for this reference (``[ppo] reward_model`` names another)."""
    from training.ppo import train_ppo
    from training.reward import load_reward_pin, reward_model_for

    reward = (load_reward_pin(config.reward_model, settings.home_dir) if config.reward_model
              else reward_model_for(reference, settings.home_dir))
    if reward is None:
        raise KtoLoopError(f"no reward model trained for reference {reference.name!r} ({reference.sha256[:12]}...); "
                           f"train one with `ktoloop reward train --snapshot {snapshot.manifest.snapshot_id}`")
    result = train_ppo(config, snapshot, reference, out_dir, reward, decision=decision,
                       cache_dir=settings.home_dir / "cache", resume=resume, override=override)
    metrics = dict(result.eval or {})
    if result.stop.get("guard"):  # KL bound or reward hacking: flagged, never promotable
        metrics["guard_stop"] = result.stop
    return TrainedRun(config.to_dict(), config.fingerprint(), metrics)


def trainer_for(method: str) -> Trainer:
    return Trainer(_ppo_config, _ppo_run) if METHODS[method].online else Trainer(_offline_config, _offline_run)


def _snapshot_and_reference(settings: Settings, snapshot_id: str, config):
    """The snapshot and its reference: the model that produced the feedback (and initialises the candidate),
    found by its version, so every generation trains from the model that served it (or the pin that the
    config's ``reference`` names, checked against that version)."""
    from training.reference import reference_for_snapshot

    snapshot = load_snapshot(snapshot_id, settings.home_dir)
    return snapshot, reference_for_snapshot(snapshot.manifest.model_version, settings.home_dir, config.reference)


def candidate_id(settings: Settings, snapshot_id: str, method: str, config=None) -> str:
    """The model id training this snapshot with this method and config (default: the settings') produces:
    method-snapshot-config fingerprint."""
    snapshot = load_snapshot(snapshot_id, settings.home_dir)
    config = config or trainer_for(method).config(settings, method)
    return f"{method}-{snapshot.manifest.snapshot_id}-{config.fingerprint()}"


def decided_candidate(settings: Settings, snapshot_id: str, method: str) -> registry.Candidate | None:
    """The candidate this snapshot, method and config already produced, when what was decided about it still
    stands: it serves, or it was rejected against the model serving now. None: train or judge it."""
    store = store_of(settings)
    candidate = registry.find(store, candidate_id(settings, snapshot_id, method))
    if candidate is None or candidate.evaluation is None:
        return None
    incumbent = registry.incumbent_for(store, candidate)
    if incumbent is not None and incumbent.model_id == candidate.model_id:
        return candidate
    if candidate.status == "rejected" and _verdict_stands(store, candidate):
        return candidate
    return None


def _verdict_stands(store: Store, candidate: registry.Candidate) -> bool:
    """A stored verdict is reused only while it is about the model serving now (or the candidate serves)."""
    stored = candidate.evaluation
    return stored is not None and "incumbent_id" in stored and not registry.verdict_is_stale(store, candidate, stored)


def train_candidate(settings: Settings, snapshot_id: str, method: str, *, config=None, model_id: str | None = None,
                    override: str | None = None, resume: bool = True) -> registry.Candidate:
    """Train (or reuse) the candidate for this snapshot, method and config; register it. ``config``: the
    method's config (default: the settings'; the CLI passes its flags on top); ``model_id``: default
    ``candidate_id``. The trainer checks ``method`` against this config's decision about the snapshot
    (``decide``); ``override`` is the recorded reason to train anyway; ``resume`` continues a stopped run."""
    trainer = trainer_for(method)
    config = config or trainer.config(settings, method)
    snapshot, reference = _snapshot_and_reference(settings, snapshot_id, config)
    model_id = model_id or candidate_id(settings, snapshot_id, method, config)
    store = store_of(settings)
    existing = registry.find(store, model_id)
    if existing is not None:
        log.info("reusing candidate %s (same snapshot and config)", model_id)
        return existing
    out_dir = settings.home_dir / "models" / model_id
    run = trainer.run(settings, config, snapshot, reference, out_dir, decide(settings, snapshot_id), override,
                      resume)
    return registry.register(store, registry.Candidate(
        model_id=model_id, method=method, snapshot_id=snapshot.manifest.snapshot_id,
        snapshot_sha256=snapshot.manifest.content_sha256, reference_name=reference.name,
        reference_sha256=reference.sha256, model_version=reference.model_version, adapter_path=str(out_dir),
        config=run.config, metrics=run.metrics, evaluation=None, status="candidate"))


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
        base, adapter = lineage.model_dirs(reference.path, candidate)
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
    base, adapter = lineage.model_dirs(reference.path, candidate)
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
    from training.evaluate import heldout_method
    from training.reference import reference_for_snapshot

    store = store_of(settings)
    loop = load_section(settings, "flows", LoopConfig)
    candidate = registry.get(store, model_id)
    incumbent = registry.incumbent_for(store, candidate)
    incumbent_id = incumbent.model_id if incumbent else None
    if _verdict_stands(store, candidate):
        return Gate(**candidate.evaluation)  # the verdict about the model serving now (or the one that promoted it)
    snapshot = load_snapshot(candidate.snapshot_id, settings.home_dir)
    reference = reference_for_snapshot(candidate.model_version, settings.home_dir, candidate.reference_name)

    capability = check_regression(store, capability_run(settings, reference, candidate),
                                  capability_run(settings, reference, None), load_monitor_config(settings))
    # every model is scored in the snapshot's one held-out form (training.evaluate.heldout_method)
    offline = load_section(settings, "training", TrainConfig)
    mine = candidate.metrics
    config = dataclasses.replace(offline, method=mine.get("method", offline.method), beta=mine.get("beta", offline.beta))
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


def promote_if_passing(settings: Settings, model_id: str, gate: Gate, *, actor: str = "retrain-flow") -> str:
    """Act on ``gate`` (from ``evaluate_candidate``, so about the model serving now): passed, the model serves,
    or with ``[flows] canary_events`` starts as a canary; failed, the rejection is recorded. Returns promoted |
    canary | rejected. A model already serving stays, whatever a re-run says."""
    store = store_of(settings)
    current = registry.promoted(store)
    if current is not None and current.model_id == model_id:
        return "promoted"  # a re-run of the same retrain: already serving
    if not gate.passed:
        registry.set_evaluation(store, model_id, gate.to_dict(), "rejected")
        return "rejected"
    if load_section(settings, "flows", LoopConfig).canary_events:
        start_canary(settings, model_id, gate)
        return "canary"
    promote(settings, model_id, gate=gate.to_dict(), actor=actor, reason="passed the gate")
    return "promoted"


def start_canary(settings: Settings, model_id: str, gate: Gate):
    """Export and pin a candidate that passed the gate under its own model version, to serve a share of
    traffic beside the serving model; ``check_canary`` decides it on their live feedback. Returns the pin."""
    store = store_of(settings)
    pending = registry.canary(store)
    if pending is not None and pending.model_id == model_id:
        return lineage.export_reference(settings, pending)  # already running: its window stands
    if pending is not None:
        raise KtoLoopError(f"{pending.model_id} is already a canary; one canary at a time (its verdict comes with "
                           f"the next retrain, or `ktoloop models canary`)")
    candidate = registry.check_promotion(store, model_id, gate=gate.to_dict())
    pin = lineage.pin_export(settings, candidate)
    since = dt.datetime.now(dt.timezone.utc).isoformat()
    started = dataclasses.replace(gate, canary={"model_version": pin.model_version, "since": since})
    registry.set_evaluation(store, model_id, started.to_dict(), "canary")
    log.info("%s is a canary: production stamps model version %s on the share of traffic it serves",
             model_id, pin.model_version)
    return pin


@dataclass(frozen=True)
class CanaryVerdict:
    model_id: str
    status: str
    """promoted | rejected | pending (too few rated answers yet)"""
    reason: str
    live: dict[str, Any] | None = None
    """The ``flows.gate.LiveTest`` as a dict, once both arms had enough rated answers."""


def live_counts(store: Store, model_version: str, since: dt.datetime) -> tuple[int, int]:
    """(thumbs-up, rated answers) of ``model_version``'s feedback landed since ``since``."""
    frame = store.read("SELECT count(*) FILTER (WHERE label) AS up, count(*) AS n FROM feedback "
                       "WHERE model_version = ? AND ingested_at >= ?", [model_version, since])
    up, n = frame.row(0)
    return int(up or 0), int(n)


def check_canary(settings: Settings, *, actor: str = "canary") -> CanaryVerdict | None:
    """Decide the pending canary (None: there is none) on the feedback landed since it started: promote it when
    its thumbs-up rate is significantly higher than the serving model's, else reject it; pending while either
    has fewer than ``[flows] canary_events`` rated answers. A canary whose serving model was rolled back or
    replaced meanwhile is rejected: its comparison no longer holds."""
    store, loop = store_of(settings), load_section(settings, "flows", LoopConfig)
    candidate = registry.canary(store)
    if candidate is None:
        return None
    offline, info = candidate.evaluation, candidate.evaluation["canary"]
    if registry.verdict_is_stale(store, candidate, offline):
        reason = (f"canary rejected: it was judged against {offline.get('incumbent_id') or 'the reference'}, "
                  f"which no longer serves")
        registry.set_evaluation(store, candidate.model_id, {**offline, "passed": False, "summary": reason}, "rejected")
        return CanaryVerdict(candidate.model_id, "rejected", reason)
    serving = lineage.serving_reference(settings, store).model_version
    since = dt.datetime.fromisoformat(info["since"])
    (c_up, c_n), (i_up, i_n) = live_counts(store, info["model_version"], since), live_counts(store, serving, since)
    needed = max(loop.canary_events, 1)
    if min(c_n, i_n) < needed:
        return CanaryVerdict(candidate.model_id, "pending",
                             f"canary {candidate.model_id} pending: {c_n} rated answers of {info['model_version']} and "
                             f"{i_n} of {serving} since {info['since']}; {needed} of each decide it")
    test = proportion_test(c_up, c_n, i_up, i_n, min_gain=loop.min_preference_gain, confidence=loop.confidence)
    head = "PROMOTE" if test.passed else "REJECT"
    summary = f"{head} | live vs {serving}: {test.describe()} | offline: {offline['summary']}"
    gate = {**offline, "passed": test.passed, "summary": summary, "live": dataclasses.asdict(test)}
    registry.set_evaluation(store, candidate.model_id, gate, "canary" if test.passed else "rejected")  # its gate line
    if test.passed:
        promote(settings, candidate.model_id, gate=gate, actor=actor, reason="canary: significantly more thumbs up")
    return CanaryVerdict(candidate.model_id, "promoted" if test.passed else "rejected", summary,
                         dataclasses.asdict(test))


def promote(settings: Settings, model_id: str, *, gate: dict[str, Any] | None, forced: bool = False,
            actor: str | None = None, reason: str = ""):
    """The one door to serving: export and pin the model as its own version (the next generation's reference),
    then move the promoted pointer. Returns the pinned export."""
    store = store_of(settings)
    candidate = registry.check_promotion(store, model_id, gate=gate, forced=forced, reason=reason)
    pin = lineage.pin_export(settings, candidate)
    registry.promote(store, model_id, gate=gate, forced=forced, actor=actor, reason=reason)
    log.info("%s now serves as model version %s (generation %d)", model_id, pin.model_version, pin.generation)
    return pin


def monitor(settings: Settings):
    """Drift report + workspace update; returns the ``DriftReport`` (its ``finding`` says whether to retrain)."""
    from monitoring.config import load_monitor_config, monitoring_dir
    from monitoring.reports import drift_report

    out = monitoring_dir(settings)
    return drift_report(store_of(settings), out / "reports", config=load_monitor_config(settings),
                        workspace=out / "workspace")
