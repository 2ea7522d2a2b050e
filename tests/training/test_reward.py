"""Reward model on a tiny Llama: separates held-out desirable/undesirable answers, pinned with lineage."""

import json

import pytest
import torch

from ktoloop.cli import main
from ktoloop.config import ConfigError
from ktoloop.errors import KtoLoopError
from train_helpers import TOPICS, bad, good, kto_rows, pair_rows, write_snapshot
from training.reference import pin_reference
from training.reward import (RewardConfig, bradley_terry_loss, load_reward_model, pin_reward_model, reward_data,
                             reward_model_for, train_reward)

FAST = dict(lr=1e-2, max_steps=16, batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Pairs on 8 topics plus unpaired thumbs on 8 others (as the snapshot builder writes: every thumb in kto)."""
    paired, unpaired, held = TOPICS[:8], TOPICS[8:16], TOPICS[16:]
    thumbs = kto_rows(paired) + [{"prompt": f"Tell me about {t}.", "completion": (good if i % 2 else bad)(t),
                                  "label": bool(i % 2)} for i, t in enumerate(unpaired)]
    return write_snapshot(tmp_path_factory.mktemp("snaps"), "mixed", kto_train=thumbs, kto_eval=kto_rows(held),
                          pairs_train=pair_rows(paired), pairs_eval=pair_rows(held))


def test_bradley_terry_is_log2_at_a_tie_and_small_when_ranked_right():
    assert bradley_terry_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(0.6931, abs=1e-4)
    assert bradley_terry_loss(torch.tensor([5.0]), torch.tensor([-5.0])).item() < 1e-4


def test_only_unpaired_thumbs_get_the_logistic_loss(mixed, tiny_model_dir):
    from transformers import AutoTokenizer

    data = reward_data(mixed, "train", AutoTokenizer.from_pretrained(tiny_model_dir), RewardConfig(), True)
    assert data.pairs.n == 8 and data.thumbs.n == 8          # the 16 thumbs behind the 8 pairs are not counted twice
    assert sorted(data.thumbs.desirable) == sorted(bool(i % 2) for i in range(8))  # the unpaired topics' labels


@pytest.mark.slow
def test_reward_model_separates_heldout_answers_and_is_pinned(mixed, tiny_reference, home, tmp_path):
    result = train_reward(RewardConfig(**FAST), mixed, tiny_reference, tmp_path / "rm")
    score = result.eval
    assert score["pairs"] == 8 and score["thumbs"] == 16       # held-out topics, never trained on
    assert score["pair_accuracy"] == 1.0 and score["thumb_auc"] == 1.0
    assert score["reward_desirable"] > 0 > score["reward_undesirable"]
    metrics = [json.loads(line) for line in (tmp_path / "rm" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 16 and "pair_loss" in metrics[0] and "thumb_loss" in metrics[0]

    assert reward_model_for(tiny_reference, home) is None
    info = pin_reward_model(tmp_path / "rm", home, "rm-1")
    assert reward_model_for(tiny_reference, home) == info
    assert info.reference_sha256 == tiny_reference.sha256
    assert info.snapshot["content_sha256"] == mixed.manifest.content_sha256
    # the loaded model scores as the trained one did (the PPO reward path)
    model = load_reward_model(info, tiny_reference)
    prompts, completions = _encode(model.tokenizer, [("Tell me about ink.", good("ink")),
                                                     ("Tell me about ink.", bad("ink"))])
    up, down = model.score(prompts, completions).tolist()
    assert up > 0 > down

    (tmp_path / "rm" / "reward_head.safetensors").write_bytes(b"tampered")
    with pytest.raises(KtoLoopError, match="reward_head.safetensors changed since it was pinned"):
        load_reward_model(info, tiny_reference)


def test_reward_model_is_refused_for_another_reference(mixed, tiny_model_dir, tiny_reference, home, tmp_path):
    result = train_reward(RewardConfig(**{**FAST, "max_steps": 1}), mixed, tiny_reference, tmp_path / "rm")
    info = pin_reward_model(result.out_dir, home, "rm-1")
    from training.modeling import random_llama_dir as build

    other = pin_reference(build(tmp_path / "other", tokenizer_dir=tiny_model_dir, seed=1), "tiny-v2", home)
    assert reward_model_for(other, home) is None
    with pytest.raises(KtoLoopError, match="not on 'tiny-v2'"):
        load_reward_model(info, other)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="reward.max_prompt_length"):
        RewardConfig(max_prompt_length=600)
    with pytest.raises(ConfigError, match="reward.batch_size"):
        RewardConfig(batch_size=0)


def test_cli_reward_train_pins_and_shows(mixed, tiny_model_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTOLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["reference", "pin", str(tiny_model_dir), "--model-version", "tiny-v1"]) == 0
    assert main(["reward", "train", "--snapshot", str(mixed.path), "--max-steps", "2", "--batch-size", "4",
                 "--device", "cpu", "--run-id", "rm-cli"]) == 0
    assert (tmp_path / "home" / "reward_models" / "rm-cli" / "reward_model.json").is_file()
    capsys.readouterr()
    assert main(["reward", "show", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "rm-cli" in out and "verified" in out


def _encode(tokenizer, rows):
    from training.data import encode_completion, render_prompt

    return [render_prompt(tokenizer, p) for p, _ in rows], [encode_completion(tokenizer, c) for _, c in rows]
