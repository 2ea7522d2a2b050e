"""Prefect 3 flows over the loop's steps (``flows.loop``), their deployments, schedules and the drift trigger.

Tasks retry only on transient faults (broker unavailable, DuckDB file locked: ``TransientError``), never on
bad data. Settings come from the environment (``KTOLOOP_CONFIG``, ``KTOLOOP_HOME``) so a served deployment
and ``ktoloop retrain --now`` read the same configuration.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext, TaskRunContext
from prefect.events import emit_event
from prefect.logging.handlers import APILogHandler

from flows import drift_trigger, loop, registry
from flows.retrain_report import ARTIFACT_KEY, retrain_markdown
from ktoloop.config import load_section, load_settings
from ktoloop.errors import KtoLoopError, TransientError

log = logging.getLogger(__name__)

DRIFT_EVENT = "kto.drift.detected"
MONITOR_RESOURCE = {"prefect.resource.id": "ktoloop.monitor", "prefect.resource.name": "kto-loop monitor"}
KTOLOOP_LOGGERS = ("ingest", "training", "flows", "monitoring", "ktoloop")
"""kto-loop logs through plain ``logging`` under these names (ingest counts, training steps, benchmarks)."""


def _in_a_run(record: logging.LogRecord) -> bool:
    return bool(getattr(record, "flow_run_id", None) or FlowRunContext.get() or TaskRunContext.get())


def send_logs_to_runs() -> None:
    """Attach kto-loop's loggers to Prefect's API log handler, so their lines show on the flow run that
    logged them. Done here, not through PREFECT_LOGGING_EXTRA_LOGGERS, which Prefect reads only when first
    imported; and INFO is let through where the root level is Prefect's WARNING (a served run's process)."""
    for name in KTOLOOP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, APILogHandler) for h in logger.handlers):
            handler = APILogHandler()
            handler.addFilter(_in_a_run)  # outside a run, a line stays on the console only
            logger.addHandler(handler)
        if logger.level == logging.NOTSET and logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


send_logs_to_runs()


def _transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    """Retry broker and lock faults; a data error fails at once."""
    return isinstance(state.result(raise_on_failure=False), TransientError)


RETRY = dict(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=_transient)


@task(name="drain", **RETRY)
def drain_task() -> dict[str, Any]:
    return loop.drain(load_settings())


@task(name="build-dataset", **RETRY)
def build_task(method: str | None = None):
    return loop.build(load_settings(), method=method)


@task(name="train", **RETRY)
def train_task(snapshot_id: str, method: str):
    return loop.train_candidate(load_settings(), snapshot_id, method)


@task(name="evaluate", **RETRY)
def evaluate_task(model_id: str):
    return loop.evaluate_candidate(load_settings(), model_id)


@task(name="promote", **RETRY)
def promote_task(model_id: str, gate) -> str:
    return loop.promote_if_passing(load_settings(), model_id, gate)


@task(name="canary", **RETRY)
def canary_task():
    return loop.check_canary(load_settings())


@task(name="drift-report", **RETRY)
def monitor_task():
    return loop.monitor(load_settings())


@flow(name="drain", log_prints=True)
def drain_flow() -> dict[str, Any]:
    """Ingest until the consumer group is caught up."""
    return drain_task()


@flow(name="build-dataset", log_prints=True)
def build_dataset_flow(method: str | None = None) -> dict[str, Any]:
    built = build_task(method)
    return {"snapshot_id": built.snapshot.manifest.snapshot_id, "decision": built.decision.to_dict()}


@flow(name="train", log_prints=True)
def train_flow(snapshot_id: str, method: str | None = None) -> dict[str, Any]:
    """Train on an existing snapshot with its decided method, or a forced one."""
    method = method or loop.decide(load_settings(), snapshot_id).method
    if method is None:
        raise KtoLoopError(f"snapshot {snapshot_id}: its decision is no training; name a method to override")
    return dataclasses.asdict(train_task(snapshot_id, method))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model_id: str) -> dict[str, Any]:
    return evaluate_task(model_id).to_dict()


@flow(name="promote", log_prints=True)
def promote_flow(model_id: str) -> str:
    return promote_task(model_id, evaluate_task(model_id))


@flow(name="monitor", log_prints=True)
def monitor_flow() -> dict[str, Any]:
    """Drift report + dashboard; on drift, emit ``kto.drift.detected`` (the trigger starts a retrain), at
    most once per ``[flows] drift_cooldown_s``."""
    settings = load_settings()
    config = load_section(settings, "flows", loop.LoopConfig)
    report = monitor_task()
    finding = report.finding
    emitted = False
    if finding.drifted and config.monitor_emit_event:
        state, now = drift_trigger.state_file(settings.home_dir), dt.datetime.now(dt.timezone.utc)
        held = drift_trigger.held_until(state, config.drift_cooldown_s, now)
        if held is not None:
            print(f"drift persists ({'; '.join(finding.reasons)}); {DRIFT_EVENT} not emitted: one was sent at "
                  f"{drift_trigger.last_emission(state)['emitted_at']}, cooldown until {held.isoformat()} "
                  f"([flows] drift_cooldown_s = {config.drift_cooldown_s})")
        else:
            emit_event(event=DRIFT_EVENT, resource=MONITOR_RESOURCE,
                       payload={"reason": "drift: " + "; ".join(finding.reasons), "finding": finding.to_dict()})
            drift_trigger.record_emission(state, now, finding.to_dict())
            emitted = True
            print(f"drift detected, {DRIFT_EVENT} emitted: {finding.reasons}")
    return {"drifted": finding.drifted, "reasons": finding.reasons, "event_emitted": emitted,
            "html": str(report.html)}


@flow(name="retrain", log_prints=True)
def retrain_flow(reason: str = "manual", method: str | None = None) -> dict[str, Any]:
    """drain -> [decide the canary] -> build -> decide -> train -> evaluate -> promote (or start a canary). Not
    enough data, or a canary still awaiting its live verdict, ends Completed, with the reason."""
    settings = load_settings()
    if load_section(settings, "flows", loop.LoopConfig).drain_before_retrain:
        drain_task()
    live = canary_task()
    canary = dataclasses.asdict(live) if live is not None else None
    if live is not None:
        print(f"canary {live.model_id}: {live.status}; {live.reason}")
        if live.status == "pending":  # one experiment at a time: train the next model from whichever wins
            return _published(loop.RetrainOutcome("canary-pending", live.reason, reason, model_id=live.model_id,
                                                  canary=canary))
    built = build_task(method)
    decision = built.decision
    snapshot_id = built.snapshot.manifest.snapshot_id
    print(f"retrain ({reason}): snapshot {snapshot_id}; decision: {'; '.join(decision.reasons + decision.warnings)}")
    if not decision.train:
        outcome = loop.RetrainOutcome("skipped", "; ".join(decision.reasons), reason, snapshot_id,
                                      decision=decision.to_dict(), canary=canary)
        return _published(outcome)
    prior = loop.decided_candidate(settings, snapshot_id, decision.method)
    if prior is not None:  # same data, method and config, and the verdict still stands: say so, redo nothing
        current = registry.promoted(loop.store_of(settings))
        serving = current is not None and current.model_id == prior.model_id
        line = (f"same snapshot {snapshot_id} and config, already decided: {prior.model_id} "
                f"{'serves' if serving else 'rejected'}; {prior.evaluation['summary']}")
        print(line)
        outcome = loop.RetrainOutcome("promoted" if serving else "rejected", line, reason, snapshot_id,
                                      prior.model_id, prior.evaluation, decision.to_dict(), already_decided=True,
                                      canary=canary)
        return _published(outcome, prior)
    candidate = train_task(snapshot_id, decision.method)
    gate = evaluate_task(candidate.model_id)
    status = promote_task(candidate.model_id, gate)
    print(f"{candidate.model_id}: {status.upper()}; {gate.summary}")
    outcome = loop.RetrainOutcome(status, gate.summary, reason, snapshot_id, candidate.model_id, gate.to_dict(),
                                  decision.to_dict(), canary=canary)
    return _published(outcome, candidate)


def _published(outcome: loop.RetrainOutcome, candidate: registry.Candidate | None = None) -> dict[str, Any]:
    """The outcome as a dict, also published as the run's ``retrain-gate`` Markdown artifact."""
    result = dataclasses.asdict(outcome)
    lineage = None
    if candidate is not None:
        lineage = {"model": candidate.model_id, "method": candidate.method, "snapshot": candidate.snapshot_id,
                   "snapshot sha256": candidate.snapshot_sha256, "reference": candidate.reference_name,
                   "reference sha256": candidate.reference_sha256, "model version": candidate.model_version,
                   "adapter": candidate.adapter_path}
    create_markdown_artifact(markdown=retrain_markdown(result, lineage), key=ARTIFACT_KEY,
                             description=f"retrain {outcome.status}: {outcome.reason[:200]}")
    return result


def run_retrain_now(*, reason: str = "manual", method: str | None = None) -> dict[str, Any]:
    """``ktoloop retrain --now``: the retrain flow, in this process (the ephemeral API is enough); like a
    served run it loads its settings from ``$KTOLOOP_CONFIG``, which the CLI sets from ``--config``."""
    return retrain_flow(reason=reason, method=method)

