"""The model registry on a real DuckDB file: gated promotion, forced overrides with who/why, rollback."""

import pytest

from flows import registry
from ktoloop.errors import KtoLoopError
from ktoloop.store import Store

PASSED = {"passed": True, "summary": "ok"}
FAILED = {"passed": False, "summary": "capability REGRESSION: arc_easy.acc_norm drop 0.05"}


def candidate(model_id: str) -> registry.Candidate:
    return registry.Candidate(model_id=model_id, method="kto", snapshot_id="ds-1", snapshot_sha256="s",
                              reference_name="ref", reference_sha256="r", model_version="v1",
                              adapter_path=f"/models/{model_id}", config={"lr": 1e-4}, metrics={"loss": 0.4},
                              evaluation=None, status="candidate")


@pytest.fixture()
def store(tmp_path):
    store = Store(tmp_path / "k.duckdb")
    for model_id in ("a", "b", "c"):
        registry.register(store, candidate(model_id))
    registry.register(store, candidate("a"))  # idempotent: a re-run registers nothing new
    return store


def test_register_is_idempotent_and_lists_lineage(store):
    assert registry.list_models(store).height == 3
    assert registry.get(store, "a").adapter_path == "/models/a"
    with pytest.raises(KtoLoopError, match="no model 'zzz' in the registry"):
        registry.get(store, "zzz")


def test_a_failed_gate_needs_force_and_a_reason_and_both_are_recorded(store):
    with pytest.raises(KtoLoopError, match="did not pass the promotion gate .*REGRESSION.*--force"):
        registry.promote(store, "a", gate=FAILED)
    with pytest.raises(KtoLoopError, match="needs --reason"):
        registry.promote(store, "a", gate=FAILED, forced=True)
    registry.promote(store, "a", gate=FAILED, forced=True, actor="alice", reason="hotfix for a bad answer")
    row = registry.history(store).row(-1, named=True)
    assert (row["model_id"], row["action"], row["forced"], row["actor"], row["reason"]) == (
        "a", "promote", True, "alice", "hotfix for a bad answer")
    assert registry.promoted(store).model_id == "a"


def test_rollback_walks_back_the_promotion_history(store):
    assert registry.promoted(store) is None  # the bare reference serves
    with pytest.raises(KtoLoopError, match="nothing to roll back"):
        registry.rollback(store)
    for model_id in ("a", "b", "c"):
        registry.promote(store, model_id, gate=PASSED)
    assert registry.get(store, "b").status == "retired" and registry.get(store, "c").status == "promoted"
    assert registry.rollback(store) == "b"
    assert registry.rollback(store) == "a"        # not back to c: a rollback pops, it does not toggle
    assert registry.rollback(store) is None       # the reference again
    assert registry.promoted(store) is None
    assert [r["action"] for r in registry.history(store).iter_rows(named=True)] == ["promote"] * 3 + ["rollback"] * 3


def test_a_verdict_is_stale_once_another_model_serves_in_its_incumbents_place(store):
    against_reference, against_a = {**PASSED, "incumbent_id": None}, {**PASSED, "incumbent_id": "a"}
    b = registry.get(store, "b")
    assert not registry.verdict_is_stale(store, b, against_reference)  # the reference serves: it holds
    registry.promote(store, "a", gate=against_reference)
    assert registry.verdict_is_stale(store, b, against_reference)
    assert not registry.verdict_is_stale(store, b, against_a)
    assert not registry.verdict_is_stale(store, b, PASSED)  # names no incumbent: not known to be stale
    with pytest.raises(KtoLoopError, match="passed the gate against the reference, but a serves now"):
        registry.promote(store, "b", gate=against_reference)
    registry.promote(store, "b", gate=against_a)
    assert not registry.verdict_is_stale(store, b, against_reference)  # b itself serves: its verdict holds
    registry.rollback(store)
    registry.rollback(store)
    assert not registry.verdict_is_stale(store, b, against_reference)  # the reference serves again
