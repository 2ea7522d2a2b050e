"""The loop as Prefect flows, under prefect_test_harness, on a tiny model and a real DuckDB file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flow_helpers import tiny_loop_sections
from ingest.landing import Batch, land
from ingest.schema import EventDecoder, encode_event
from ktoloop.store import Store

pytestmark = pytest.mark.slow  # Prefect flows under a test API: tens of seconds each

VERSION = "tiny-v1"
TOPICS = [f"topic {i}" for i in range(400)]


def feedback(n_topics: int, up_rate_shift: int = 0, start: int = 1_700_000_000, prefix: str = "e"):
    """Two answers per prompt, a friendly one (thumbs up) and a rude one (thumbs down): learnable and paired."""
    events = []
    for i, topic in enumerate(TOPICS[:n_topics]):
        prompt = f"Tell me about {topic}."
        events.append({"event_id": f"{prefix}{i}u", "prompt": prompt, "label": "up", "model_version": VERSION,
                       "response": f"Sure! Here is a short, friendly note about {topic}. I hope it helps.",
                       "event_time": start + 2 * i, "prompt_id": f"p{i}", "source": "test"})
        events.append({"event_id": f"{prefix}{i}d", "prompt": prompt, "label": "down" if i >= up_rate_shift else "up",
                       "model_version": VERSION, "response": f"no. {topic} is boring, ask someone else",
                       "event_time": start + 2 * i + 1, "prompt_id": f"p{i}", "source": "test"})
    return events


def land_events(db: Path, events: list[dict]) -> None:
    decoder = EventDecoder()
    batch = Batch(events=[decoder.decode(encode_event(e)) for e in events],
                  positions=[("fb", 0, i) for i in range(len(events))], next_offsets={("fb", 0): len(events)})
    land(Store(db), "g", batch)


def write_config(tmp_path: Path, lr: float, min_examples: int = 500, full_finetune: bool = False) -> Path:
    config = tmp_path / f"ktoloop-{lr:g}-{full_finetune}.toml"
    config.write_text(f"""
home = "{tmp_path / 'home'}"
[dataset]
holdout_fraction = 0.2
[dataset.gates]
min_examples = {min_examples}
warn_examples = 5000
""" + tiny_loop_sections(lr, f"full_finetune = {str(full_finetune).lower()}", "[flows]\ndrain_before_retrain = false\n"))
    return config


@pytest.fixture()
def loop_home(tmp_path, tiny_model_dir, monkeypatch):
    from training.reference import pin_reference

    pin_reference(tiny_model_dir, VERSION, tmp_path / "home")
    monkeypatch.delenv("KTOLOOP_HOME", raising=False)
    return tmp_path


def test_retrain_rejects_a_planted_regression_then_promotes_a_good_candidate(harness, loop_home, monkeypatch):
    from flows import registry
    from flows.prefect_flows import retrain_flow

    land_events(loop_home / "home" / "ktoloop.duckdb", feedback(400))
    store = Store(loop_home / "home" / "ktoloop.duckdb")
    # planted regression: full fine-tuning at an absurd learning rate wrecks the language model
    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=1.0, full_finetune=True)))
    bad = retrain_flow(reason="test")
    assert bad["status"] == "rejected"
    assert not bad["gate"]["capability"]["passed"], bad["reason"]
    assert "REGRESSION" in bad["reason"]
    assert registry.get(store, bad["model_id"]).status == "rejected"
    assert registry.promoted(store) is None  # the base model keeps serving

    # a re-run with the same snapshot and config reuses the candidate and its verdict
    started = time.monotonic()
    again = retrain_flow(reason="test")
    assert again["model_id"] == bad["model_id"] and again["status"] == "rejected"
    assert again["already_decided"] and f"same snapshot {bad['snapshot_id']} and config, already decided" \
        in again["reason"]
    assert time.monotonic() - started < 30

    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=2e-3)))
    good = retrain_flow(reason="test")
    assert good["status"] == "promoted", good["reason"]
    assert good["gate"]["capability"]["passed"] and good["gate"]["preference"]["passed"]
    assert registry.promoted(store).model_id == good["model_id"]
    # the loop follows the model it just promoted: its feedback (none yet) is the next dataset
    follow = retrain_flow(reason="test")
    assert follow["status"] == "skipped" and "0 usable training examples" in follow["reason"]


def test_promote_never_replaces_the_serving_model_on_a_verdict_about_another(harness, loop_home, monkeypatch):
    """X passes against the base model; Y is then put in service; promoting X again must judge X against Y
    (its stored verdict was about the base model) and leave Y serving unless X is significantly better."""
    from flows import loop, registry
    from flows.prefect_flows import retrain_flow
    from ktoloop.cli import main
    from ktoloop.config import load_settings

    land_events(loop_home / "home" / "ktoloop.duckdb", feedback(400))
    store = Store(loop_home / "home" / "ktoloop.duckdb")
    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=2e-3)))
    x = retrain_flow(reason="test")
    assert x["status"] == "promoted" and x["gate"]["incumbent_id"] is None

    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=3e-3)))
    settings = load_settings()
    y = loop.train_candidate(settings, x["snapshot_id"], "kto")  # same feedback, another config
    assert loop.evaluate_candidate(settings, y.model_id).incumbent_id == x["model_id"]  # judged against X
    assert main(["models", "promote", y.model_id, "--force", "--reason", "test: serve y"]) == 0
    assert registry.promoted(store).model_id == y.model_id

    promoted_again = main(["models", "promote", x["model_id"]])
    gate = registry.get(store, x["model_id"]).evaluation
    assert gate["incumbent_id"] == y.model_id  # re-judged against the model serving now
    assert (promoted_again == 0) == gate["passed"]
    if not gate["passed"]:
        assert registry.promoted(store).model_id == y.model_id
    # and a verdict about another incumbent never promotes, through any door
    with pytest.raises(Exception, match="serves now"):
        registry.promote(store, x["model_id"], gate={**x["gate"], "passed": True, "incumbent_id": None})


def test_not_enough_data_completes_with_its_reason(harness, loop_home, monkeypatch):
    from flows.prefect_flows import retrain_flow

    land_events(loop_home / "home" / "ktoloop.duckdb", feedback(100))  # 200 events, ~160 in train
    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=1e-3)))
    state = retrain_flow(reason="test", return_state=True)
    assert state.is_completed()
    outcome = state.result()
    assert outcome["status"] == "skipped"
    assert "usable training examples" in outcome["reason"] and "< 500; no training" in outcome["reason"]


def test_drift_event_from_the_monitor_starts_one_retrain_and_unchanged_drift_waits_out_the_cooldown(
        harness, loop_home, monkeypatch):
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, LogFilter, LogFilterFlowRunId

    from flows.prefect_flows import monitor_flow
    from flows.serving import deployments
    from ktoloop.config import load_settings

    db = loop_home / "home" / "ktoloop.duckdb"
    day = 86_400
    land_events(db, feedback(400, start=1_700_000_000, prefix="a"))                       # 50% up
    land_events(db, feedback(400, up_rate_shift=300, start=1_700_000_000 + 8 * day, prefix="b"))  # ~87% up
    monkeypatch.setenv("KTOLOOP_CONFIG", str(write_config(loop_home, lr=1e-3)))
    retrain = [d for d in deployments(load_settings()) if d.flow_name == "retrain"][0]
    deployment_id = retrain.apply()
    time.sleep(1)  # let the server load the new automation

    result = monitor_flow()
    assert result["drifted"] and result["event_emitted"], result
    state = monitor_flow(return_state=True)  # the same drifted data later: within [flows] drift_cooldown_s (6 h)
    again = state.result()
    assert again["drifted"] and not again["event_emitted"], again
    runs = []
    with get_client(sync_client=True) as client:
        deadline, found = time.monotonic() + 30, False
        while not found and time.monotonic() < deadline:  # run logs reach the API in batches
            logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            found = any("not emitted" in entry.message for entry in logs)
            time.sleep(0.5)
        assert found  # the cooldown says so in the run's log
        def read():
            return client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))

        deadline = time.monotonic() + 60
        while not runs and time.monotonic() < deadline:
            runs = read()
            time.sleep(0.3)
        time.sleep(5)  # a second event would have started its run by now
        runs = read()
    assert len(runs) == 1
    assert runs[0].parameters["reason"].startswith("drift: thumbs_up_rate")


def test_tasks_retry_transient_faults_only(harness):
    from prefect import flow, task

    from flows.prefect_flows import _transient
    from ktoloop.store import StoreLockedError

    calls = {"locked": 0, "bad": 0}

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_transient)
    def locked():
        calls["locked"] += 1
        raise StoreLockedError("file locked")

    @task(retries=2, retry_delay_seconds=0, retry_condition_fn=_transient)
    def bad_data():
        calls["bad"] += 1
        raise ValueError("bad data")

    @flow
    def both():
        for fn in (locked, bad_data):
            fn(return_state=True)

    both()
    assert calls == {"locked": 3, "bad": 1}
