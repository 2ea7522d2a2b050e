"""The model registry: candidates with their lineage, and one promoted pointer with its history.

The pointer is the newest row of ``promotions`` (NULL model_id = the bare pinned reference), so promoting,
rolling back and "who did what, and why" are one append-only table.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
from dataclasses import dataclass
from typing import Any

import polars as pl

from ktoloop.errors import KtoLoopError
from ktoloop.store import Store

UTC = dt.timezone.utc


@dataclass(frozen=True)
class Candidate:
    model_id: str
    method: str
    snapshot_id: str
    snapshot_sha256: str
    reference_name: str
    reference_sha256: str
    model_version: str
    adapter_path: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    evaluation: dict[str, Any] | None
    status: str
    created_at: dt.datetime | None = None


def _row_to_candidate(row: dict[str, Any]) -> Candidate:
    for key in ("config", "metrics", "evaluation"):
        if isinstance(row[key], str):
            row[key] = json.loads(row[key])
    return Candidate(**row)


def register(store: Store, candidate: Candidate) -> Candidate:
    """Record a trained candidate (idempotent on model_id: a re-run of the same training reuses the row)."""
    with store.writer() as con:
        con.execute(
            "INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [candidate.model_id, candidate.method, candidate.snapshot_id, candidate.snapshot_sha256,
             candidate.reference_name, candidate.reference_sha256, candidate.model_version,
             candidate.adapter_path, json.dumps(candidate.config), json.dumps(candidate.metrics),
             json.dumps(candidate.evaluation) if candidate.evaluation is not None else None,
             candidate.status, candidate.created_at or dt.datetime.now(UTC)],
        )
    return get(store, candidate.model_id)


def get(store: Store, model_id: str) -> Candidate:
    frame = store.read("SELECT * FROM models WHERE model_id = ?", [model_id])
    if frame.height == 0:
        raise KtoLoopError(f"no model {model_id!r} in the registry; see `ktoloop models list`")
    return _row_to_candidate(frame.row(0, named=True))


def find(store: Store, model_id: str) -> Candidate | None:
    frame = store.read("SELECT * FROM models WHERE model_id = ?", [model_id])
    return _row_to_candidate(frame.row(0, named=True)) if frame.height else None


def list_models(store: Store) -> pl.DataFrame:
    return store.read("""
        SELECT m.model_id, m.method, m.snapshot_id, m.status, m.model_version,
               round(CAST(m.metrics->>'$.loss' AS DOUBLE), 4) AS heldout_loss,
               round(CAST(m.metrics->>'$.accuracy' AS DOUBLE), 3) AS heldout_acc,
               m.created_at
        FROM models m ORDER BY m.created_at DESC""")


def set_evaluation(store: Store, model_id: str, evaluation: dict[str, Any], status: str) -> None:
    with store.writer() as con:
        con.execute("UPDATE models SET evaluation = ?, status = ? WHERE model_id = ?",
                    [json.dumps(evaluation, default=str), status, model_id])


def promoted(store: Store) -> Candidate | None:
    """The model now serving, or None for the bare reference."""
    stack = _stack(store)
    return get(store, stack[-1]) if stack and stack[-1] is not None else None


def canary(store: Store) -> Candidate | None:
    """The candidate serving a share of traffic as a canary (``[flows] canary_events``), if any."""
    frame = store.read("SELECT * FROM models WHERE status = 'canary' ORDER BY created_at DESC LIMIT 1")
    return _row_to_candidate(frame.row(0, named=True)) if frame.height else None


def incumbent_for(store: Store, candidate: Candidate) -> Candidate | None:
    """What ``candidate`` must beat: the promoted model when it was trained on the same model version's feedback,
    else None (the reference, which is then the serving model itself: a model of another version is not
    comparable on this candidate's snapshot)."""
    serving = promoted(store)
    return serving if serving is not None and serving.model_version == candidate.model_version else None


def verdict_is_stale(store: Store, candidate: Candidate, gate: dict[str, Any]) -> bool:
    """A verdict compares ``candidate`` with the model that served when it was reached (``incumbent_id``; None:
    the reference); it is stale once another model serves in its place, unless the candidate itself serves. A
    verdict that names no incumbent is not known to be stale."""
    if "incumbent_id" not in gate:
        return False
    serving = incumbent_for(store, candidate)
    serving_id = serving.model_id if serving else None
    return gate["incumbent_id"] != serving_id and serving_id != candidate.model_id


def history(store: Store) -> pl.DataFrame:
    return store.read("SELECT seq, model_id, action, forced, actor, reason, changed_at FROM promotions ORDER BY seq")


def _append(con: Any, model_id: str | None, action: str, forced: bool, actor: str, reason: str,
            gate: dict[str, Any] | None) -> None:
    seq = con.execute("SELECT coalesce(max(seq), 0) + 1 FROM promotions").fetchone()[0]
    con.execute("INSERT INTO promotions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [seq, model_id, action, forced, actor, reason, json.dumps(gate, default=str) if gate else None,
                 dt.datetime.now(UTC)])


def check_promotion(store: Store, model_id: str, *, gate: dict[str, Any] | None, forced: bool = False,
                    reason: str = "") -> Candidate:
    """Refuse a promotion the gate did not pass (unless forced with a reason) or one judged against a model
    that no longer serves; returns the candidate."""
    candidate = get(store, model_id)
    passed = bool(gate and gate.get("passed"))
    if not passed and not forced:
        raise KtoLoopError(f"{model_id} did not pass the promotion gate ({(gate or {}).get('summary', 'not evaluated')});"
                           " use --force with --reason to override")
    if forced and not reason:
        raise KtoLoopError("a forced promotion needs --reason (it is recorded with who forced it)")
    if passed and not forced and verdict_is_stale(store, candidate, gate):
        serving = incumbent_for(store, candidate)
        raise KtoLoopError(f"{model_id} passed the gate against {gate['incumbent_id'] or 'the reference'}, but "
                           f"{serving.model_id if serving else 'the reference'} serves now; evaluate it again "
                           f"(`ktoloop models promote`)")
    return candidate


def promote(store: Store, model_id: str, *, gate: dict[str, Any] | None, forced: bool = False,
            actor: str | None = None, reason: str = "") -> None:
    """Point serving at ``model_id`` (see ``check_promotion``); who and why are recorded."""
    candidate = check_promotion(store, model_id, gate=gate, forced=forced, reason=reason)
    with store.writer() as con:
        con.execute("UPDATE models SET status = 'retired' WHERE status = 'promoted'")
        con.execute("UPDATE models SET status = 'promoted' WHERE model_id = ?", [candidate.model_id])
        _append(con, candidate.model_id, "promote", forced, actor or getpass.getuser(),
                reason or "passed the gate", gate)


def _stack(store: Store) -> list[str | None]:
    """Replay the history: a promotion pushes, a rollback pops. The top is what serves."""
    stack: list[str | None] = []
    for model_id, action in store.read("SELECT model_id, action FROM promotions ORDER BY seq").iter_rows():
        if action == "promote":
            stack.append(model_id)
        elif stack:
            stack.pop()
    return stack


def rollback(store: Store, *, actor: str | None = None, reason: str = "rollback") -> str | None:
    """Point serving back at the model promoted before the current one (or the bare reference)."""
    stack = _stack(store)
    if not stack:
        raise KtoLoopError("nothing to roll back: no promoted model (the bare reference is serving)")
    current, target = stack[-1], (stack[-2] if len(stack) > 1 else None)
    with store.writer() as con:
        con.execute("UPDATE models SET status = 'retired' WHERE model_id = ?", [current])
        if target is not None:
            con.execute("UPDATE models SET status = 'promoted' WHERE model_id = ?", [target])
        _append(con, target, "rollback", False, actor or getpass.getuser(), reason, None)
    return target
