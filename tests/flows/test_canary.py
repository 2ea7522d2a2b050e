"""The canary: a candidate that passes the gate serves a share of traffic first, and replaces the serving model
only when its live thumbs-up rate is significantly higher. Real broker, DuckDB and Prefect flows, tiny models."""

from __future__ import annotations

import contextlib
import io

import pytest

from flow_helpers import generations_config
from test_generations import BASE, feedback


def cli(config, *args: str) -> str:
    """``ktoloop --config CONFIG ARGS`` in this process; its stdout. (Not capsys: Prefect's console log handler
    would keep the per-test stream it was created on, and later tests' flow runs would write to it closed.)"""
    from ktoloop.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--config", str(config), *args]) == 0
    return out.getvalue()


def live(version: str, prefix: str, ups: int, n: int) -> list[dict]:
    """``n`` rated answers of ``version``, ``ups`` of them liked: what its share of traffic brought back."""
    return [{"event_id": f"{prefix}-{i}", "prompt": f"Live question {prefix} {i}?", "response": f"An answer {i}.",
             "label": "up" if i < ups else "down", "model_version": version, "event_time": 1_800_000_000 + i,
             "prompt_id": f"{prefix}-p{i}", "source": "test"} for i in range(n)]


@pytest.mark.broker
@pytest.mark.slow
def test_a_canary_serves_only_when_its_live_rate_is_significantly_higher(harness, broker, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    from flows import registry
    from flows.lineage import export_reference, served_version, serving_reference
    from flows.prefect_flows import retrain_flow
    from ingest.publish import publish
    from ingest.schema import encode_event
    from ktoloop.config import load_settings
    from ktoloop.store import Store
    from training.reference import pin_reference

    config = generations_config(tmp_path, broker, monkeypatch, after="[flows]\ncanary_events = 40\n")
    settings = load_settings(config)
    store = Store(settings.db_path)
    send = lambda events: publish(settings.kafka, [encode_event(e) for e in events])  # noqa: E731
    pin_reference(tiny_model_dir, BASE, settings.home_dir)

    # passing the gate makes a canary: pinned under its own version, while the base model still serves
    send(feedback(BASE, "g0"))
    first = retrain_flow(reason="generation 1")
    assert first["status"] == "canary", first["reason"]
    c1 = registry.get(store, first["model_id"])
    assert c1.status == "canary" and registry.promoted(store) is None
    version = export_reference(settings, c1).model_version
    assert version == served_version(BASE, 1, c1.model_id) == c1.evaluation["canary"]["model_version"]
    assert serving_reference(settings, store).model_version == BASE
    listed = cli(config, "models", "list")
    assert f"canary: {c1.model_id} since" in listed and f"model_version = {version!r} on the feedback" in listed

    # too few live ratings: the retrain waits for the verdict and trains nothing new
    send(live(version, "c1-early", 10, 20) + live(BASE, "base-early", 5, 20))
    waiting = retrain_flow(reason="too early")
    assert waiting["status"] == "canary-pending" and waiting["model_id"] == c1.model_id
    assert "20 rated answers" in waiting["reason"] and registry.list_models(store).height == 1

    # 22 of 60 liked against 25 of 60: not higher, so rejected; the base model serves on, and the same retrain
    # trains the next candidate from its feedback, which has grown
    send(live(version, "c1", 12, 40) + live(BASE, "base", 20, 40))
    decided = retrain_flow(reason="generation 1 live")
    assert decided["canary"]["status"] == "rejected", decided["canary"]["reason"]
    assert decided["canary"]["live"]["n_candidate"] == 60 and decided["canary"]["live"]["candidate"] == 22 / 60
    assert registry.get(store, c1.model_id).status == "rejected" and registry.promoted(store) is None
    assert decided["status"] == "canary" and decided["model_id"] != c1.model_id, decided["reason"]
    c2 = registry.get(store, decided["model_id"])
    assert c2.model_version == BASE
    c2_version = c2.evaluation["canary"]["model_version"]

    # 50 of 60 liked against 20 of 60: significantly higher, so it serves (`ktoloop models canary` decides now)
    send(live(c2_version, "c2", 50, 60) + live(BASE, "base-2", 20, 60))
    assert "PROMOTE | live vs tiny-v1" in cli(config, "models", "canary")
    assert registry.promoted(store).model_id == c2.model_id
    assert registry.get(store, c2.model_id).evaluation["summary"].startswith("PROMOTE | live vs tiny-v1")
    assert "PROMOTE | live vs tiny-v1" in cli(config, "models", "show", c2.model_id)  # its lineage gate line
    assert registry.history(store)["actor"].to_list()[-1] == "canary"
    assert serving_reference(settings, store).model_version == c2_version
    assert "no canary pending" in cli(config, "models", "canary")
    # the next retrain is built from the new serving version's feedback: its 60 live ratings, too few to train
    after = retrain_flow(reason="generation 2")
    assert after["canary"] is None and after["status"] == "skipped"


def test_a_canary_judged_against_a_model_that_no_longer_serves_is_rejected(tmp_path):
    import datetime as dt

    from flows import registry
    from flows.loop import check_canary, store_of
    from ktoloop.config import load_settings
    from test_registry import candidate

    config = tmp_path / "ktoloop.toml"
    config.write_text(f'home = "{tmp_path / "home"}"\n[flows]\ncanary_events = 30\n')
    settings = load_settings(config)
    store = store_of(settings)
    for model_id in ("a", "b"):
        registry.register(store, candidate(model_id))
    started = {"model_version": "v1+g1-0000beef", "since": dt.datetime.now(dt.timezone.utc).isoformat()}
    registry.set_evaluation(store, "b", {"passed": True, "summary": "PROMOTE | offline", "incumbent_id": None,
                                         "canary": started}, "canary")
    assert registry.canary(store).model_id == "b"
    registry.promote(store, "a", gate=None, forced=True, actor="alice", reason="hotfix")  # serving moved meanwhile
    verdict = check_canary(settings)
    assert verdict.status == "rejected" and "judged against the reference, which no longer serves" in verdict.reason
    assert registry.get(store, "b").status == "rejected" and registry.canary(store) is None
    assert registry.promoted(store).model_id == "a" and check_canary(settings) is None
