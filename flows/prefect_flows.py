"""Prefect 3 flows over the loop's steps (``flows.loop``), their deployments, schedules and the drift trigger.

Tasks retry only on transient faults (broker unavailable, DuckDB file locked: ``TransientError``), never on
bad data. Settings come from the environment (``KTOLOOP_CONFIG``, ``KTOLOOP_HOME``) so a served deployment
and ``ktoloop retrain --now`` read the same configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from prefect import flow, task
from prefect.events import emit_event

from flows import loop
from ktoloop.config import Settings, load_section, load_settings
from ktoloop.errors import TransientError

log = logging.getLogger(__name__)

DRIFT_EVENT = "kto.drift.detected"
MONITOR_RESOURCE = {"prefect.resource.id": "ktoloop.monitor", "prefect.resource.name": "kto-loop monitor"}


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
def promote_task(model_id: str, gate) -> bool:
    return loop.promote_if_passing(load_settings(), model_id, gate)


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
    from ktoloop.snapshot import load_snapshot

    method = method or load_snapshot(snapshot_id, load_settings().home_dir).manifest.decision["method"]
    return dataclasses.asdict(train_task(snapshot_id, method))


@flow(name="evaluate", log_prints=True)
def evaluate_flow(model_id: str) -> dict[str, Any]:
    return evaluate_task(model_id).to_dict()


@flow(name="promote", log_prints=True)
def promote_flow(model_id: str) -> bool:
    return promote_task(model_id, evaluate_task(model_id))


@flow(name="monitor", log_prints=True)
def monitor_flow() -> dict[str, Any]:
    """Drift report + dashboard; on drift, emit ``kto.drift.detected`` (the trigger starts a retrain)."""
    report = monitor_task()
    finding = report.finding
    if finding.drifted and load_section(load_settings(), "flows", loop.LoopConfig).monitor_emit_event:
        emit_event(event=DRIFT_EVENT, resource=MONITOR_RESOURCE,
                   payload={"reason": "drift: " + "; ".join(finding.reasons), "finding": finding.to_dict()})
        print(f"drift detected, {DRIFT_EVENT} emitted: {finding.reasons}")
    return {"drifted": finding.drifted, "reasons": finding.reasons, "html": str(report.html)}


@flow(name="retrain", log_prints=True)
def retrain_flow(reason: str = "manual", method: str | None = None) -> dict[str, Any]:
    """drain -> build -> decide -> train -> evaluate -> promote. Not enough data ends Completed, with the reason."""
    settings = load_settings()
    if load_section(settings, "flows", loop.LoopConfig).drain_before_retrain:
        drain_task()
    built = build_task(method)
    decision = built.decision
    snapshot_id = built.snapshot.manifest.snapshot_id
    print(f"retrain ({reason}): snapshot {snapshot_id}; decision: {'; '.join(decision.reasons + decision.warnings)}")
    if not decision.train:
        outcome = loop.RetrainOutcome("skipped", "; ".join(decision.reasons), reason, snapshot_id,
                                      decision=decision.to_dict())
        return dataclasses.asdict(outcome)
    candidate = train_task(snapshot_id, decision.method)
    gate = evaluate_task(candidate.model_id)
    promoted = promote_task(candidate.model_id, gate)
    print(f"{candidate.model_id}: {'PROMOTED' if promoted else 'rejected'}; {gate.summary}")
    outcome = loop.RetrainOutcome("promoted" if promoted else "rejected", gate.summary, reason, snapshot_id,
                                  candidate.model_id, gate.to_dict(), decision.to_dict())
    return dataclasses.asdict(outcome)


def run_retrain_now(*, reason: str = "manual", method: str | None = None) -> dict[str, Any]:
    """``ktoloop retrain --now``: the retrain flow, in this process (the ephemeral API is enough); like a
    served run it loads its settings from ``$KTOLOOP_CONFIG``, which the CLI sets from ``--config``."""
    return retrain_flow(reason=reason, method=method)


def serve_forever(settings: Settings, api_port: int = 4200) -> None:
    """Serve drain / monitor / retrain with their schedules and the drift trigger (see ``flows.serving``)."""
    from flows.serving import serve_deployments

    serve_deployments(settings, api_port=api_port)
