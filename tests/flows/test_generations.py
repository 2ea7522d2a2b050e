"""Two generations through the real broker, DuckDB and Prefect flows: the loop follows the serving model."""

from __future__ import annotations

import pytest

from flow_helpers import generations_config
from flows.lineage import served_version
from ktoloop.store import Store

pytestmark = [pytest.mark.broker, pytest.mark.slow]

BASE = "tiny-v1"


def feedback(version: str, prefix: str, n_topics: int = 200, start: int = 1_700_000_000) -> list[dict]:
    """A friendly answer liked and a rude one not, per prompt: learnable and paired."""
    events = []
    for i in range(n_topics):
        topic = f"{prefix} topic {i}"
        for k, (response, label) in enumerate(((f"Sure! Here is a short, friendly note about {topic}.", "up"),
                                               (f"no. {topic} is boring, ask someone else", "down"))):
            events.append({"event_id": f"{prefix}-{i}-{k}", "prompt": f"Tell me about {topic}.", "response": response,
                           "label": label, "model_version": version, "event_time": start + 2 * i + k,
                           "prompt_id": f"{prefix}-p{i}", "source": "test"})
    return events


def test_two_generations_then_a_rollback(harness, broker, tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flows import registry
    from flows.lineage import chain, export_reference, serving_reference
    from flows.prefect_flows import retrain_flow
    from ingest.publish import publish
    from ingest.schema import encode_event
    from ktoloop.cli import main
    from ktoloop.config import load_settings
    from ktoloop.snapshot import load_snapshot
    from training.reference import pin_reference

    config = generations_config(tmp_path, broker, monkeypatch)
    settings = load_settings(config)
    store = Store(settings.db_path)
    base = pin_reference(tiny_model_dir, BASE, settings.home_dir)

    # generation 1: feedback on the base model's answers
    publish(settings.kafka, [encode_event(e) for e in feedback(BASE, "g0")])
    first = retrain_flow(reason="generation 1")
    assert first["status"] == "promoted", first["reason"]
    g1 = registry.get(store, first["model_id"])
    pin = export_reference(settings, g1)
    assert pin.model_version == served_version(BASE, 1, g1.model_id) and pin.parent == BASE and pin.generation == 1
    assert serving_reference(settings, store).model_version == pin.model_version
    pin.verify()  # the export on disk is what was pinned
    model = AutoModelForCausalLM.from_pretrained(pin.path)  # plain transformers loads it, and it generates
    tokenizer = AutoTokenizer.from_pretrained(pin.path)
    assert tokenizer.chat_template
    out = model.generate(**tokenizer("Tell me about tea.", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 0
    # `ktoloop models export` writes the same model as the pinned export
    assert main(["--config", str(config), "models", "export", g1.model_id, str(tmp_path / "exported")]) == 0
    exported = pin_reference(tmp_path / "exported", "check", tmp_path / "scratch")
    assert exported.files["model.safetensors"] == pin.files["model.safetensors"]

    # generation 2: the served model's feedback, plus late feedback of the base model that must stay out
    publish(settings.kafka, [encode_event(e) for e in feedback(pin.model_version, "g1") + feedback(BASE, "late", 50)])
    second = retrain_flow(reason="generation 2")
    snapshot = load_snapshot(second["snapshot_id"], settings.home_dir)
    assert snapshot.manifest.model_version == pin.model_version
    assert snapshot.manifest.counts["excluded_other_versions"] == 400 + 100  # generation 0's and the late ones
    prompts = set(snapshot.kto("train")["prompt"]) | set(snapshot.kto("eval")["prompt"])
    assert prompts and all(p.startswith("Tell me about g1 ") for p in prompts)
    g2 = registry.get(store, second["model_id"])
    assert g2.reference_sha256 == pin.sha256 and g2.model_version == pin.model_version
    links = chain(settings, store, g2.model_id)
    assert [link.generation for link in links] == [2, 1, 0]
    assert [link.model_version for link in links[1:]] == [pin.model_version, BASE]
    assert links[1].gate.startswith("PROMOTE")

    # rollback: the base model serves again, so the next retrain is built from its feedback
    if second["status"] == "promoted":
        registry.rollback(store, reason="test")
    registry.rollback(store, reason="test")
    assert serving_reference(settings, store).model_version == BASE == base.model_version
    third = retrain_flow(reason="after rollback")
    assert load_snapshot(third["snapshot_id"], settings.home_dir).manifest.model_version == BASE
