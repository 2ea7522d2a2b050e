"""The reference log-prob cache is addressed by the content of each sequence, never by its row position."""

from __future__ import annotations

import math

import pytest
import torch

from flows.dataset import DatasetConfig, build_dataset
from ktoloop.methods import GateConfig
from ingest.landing import Batch, land
from ingest.schema import EventDecoder, encode_event
from ktoloop.store import Store
from train_helpers import TOPICS, bad, good
from training.config import TrainConfig
from training.data import Encoded, encode_snapshot
from training.logprobs import ReferenceCache, compute_logps
from training.modeling import load_model
from training.trainer import train


def test_cached_values_follow_their_sequence_when_rows_are_reordered(tiny_reference, toy, tmp_path):
    model, tokenizer = load_model(tiny_reference.path, device="cpu")
    data = encode_snapshot(toy, "train", tokenizer, False, 128, 64)
    pairs = data.sequences(list(range(data.n)))
    cache = ReferenceCache.for_reference(tmp_path, tiny_reference.sha256, torch.device("cpu"))
    assert cache.fill(model, data, pairs, tokenizer.pad_token_id, torch.device("cpu"), 8) == data.n

    order = list(reversed(range(data.n)))  # the same sequences, rows in another order
    shuffled = Encoded([data.prompts[i] for i in order], [data.completions[i] for i in order], False,
                       128, 64, [data.desirable[i] for i in order])
    reread = ReferenceCache.for_reference(tmp_path, tiny_reference.sha256, torch.device("cpu"))
    assert reread.missing(shuffled, pairs) == []                       # every sequence is a hit...
    expected = compute_logps(model, shuffled, pairs, tokenizer.pad_token_id, torch.device("cpu"), 8)
    assert torch.allclose(reread.get(shuffled, pairs, torch.device("cpu")), expected, atol=1e-5)
    # ...and a sequence the cache never saw (another truncation) is a miss, not another row's value
    longer = Encoded(shuffled.prompts, shuffled.completions, False, 128, 8, shuffled.desirable)
    assert len(reread.missing(longer, pairs)) == data.n


def land_events(path, events) -> Store:
    store = Store(path)
    decoder = EventDecoder()
    land(store, "g", Batch(events=[decoder.decode(encode_event(e)) for e in events],
                           positions=[("fb", 0, i) for i in range(len(events))],
                           next_offsets={("fb", 0): len(events)}))
    return store


@pytest.mark.parametrize("method, first_loss", [("kto", 0.5), ("dpo", math.log(2))])
@pytest.mark.slow
def test_replayed_in_another_order_rebuilt_and_trained_step_one_is_exact(method, first_loss, tiny_reference,
                                                                         tmp_path):
    events = []
    for i, topic in enumerate(TOPICS):
        prompt = f"Tell me about {topic}."
        events += [{"event_id": f"u{i}", "prompt": prompt, "response": good(topic), "label": "up"},
                   {"event_id": f"d{i}", "prompt": prompt, "response": bad(topic), "label": "down"}]
    events = [{**e, "model_version": "tiny-v1", "event_time": 1_700_000_000 + k} for k, e in enumerate(events)]
    config = DatasetConfig(holdout_fraction=0.25, gates=GateConfig(min_examples=1, warn_examples=10, min_pairs=1))
    train_config = TrainConfig(method=method, max_steps=1, batch_size=4, lr=1e-2, device="cpu")
    cache = tmp_path / "cache"  # one cache for both generations of the snapshot, as under one home

    built = build_dataset(land_events(tmp_path / "a.duckdb", events), tmp_path / "a", config, "tiny-v1")
    first = built.snapshot
    train(train_config, first, tiny_reference, tmp_path / "run-a", cache_dir=cache, decision=built.decision)
    rebuilt = build_dataset(land_events(tmp_path / "b.duckdb", events[::-1]), tmp_path / "b", config, "tiny-v1")
    replay = rebuilt.snapshot
    assert replay.manifest.snapshot_id == first.manifest.snapshot_id  # same content, same id and hash

    run = train(train_config, replay, tiny_reference, tmp_path / "run-b", cache_dir=cache, decision=rebuilt.decision)
    assert run.meta["final_train_metrics"]["loss"] == pytest.approx(first_loss, rel=1e-4)
    assert abs(run.meta["final_train_metrics"]["rewards/margin"]) < 1e-4  # policy == reference at step 1


def test_reference_fill_logs_progress_with_a_rate_and_an_eta(tiny_reference, toy, tmp_path, monkeypatch, caplog):
    import logging
    import re

    from ktoloop import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)  # a line after every batch instead of every 10 s
    model, tokenizer = load_model(tiny_reference.path, device="cpu")
    data = encode_snapshot(toy, "train", tokenizer, False, 128, 64)
    pairs = data.sequences(list(range(data.n)))
    cache = ReferenceCache.for_reference(tmp_path, tiny_reference.sha256, torch.device("cpu"))
    with caplog.at_level(logging.INFO, logger="training.logprobs"):
        cache.fill(model, data, pairs, tokenizer.pad_token_id, torch.device("cpu"), 2)
    lines = [r.getMessage() for r in caplog.records if "/s, ETA" in r.getMessage()]
    assert lines, caplog.text
    assert all(re.fullmatch(rf"reference log-probs: \d+/{data.n} sequences, [\d.e+]+ seq/s, ETA (\d+ s|\d+ min)", line)
               for line in lines), lines
