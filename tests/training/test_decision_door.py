"""Every door to training honours the decision about its snapshot: the Python API, the CLI, PPO; an override
is recorded."""

from __future__ import annotations

import json

import pytest

from ktoloop.cli import main
from ktoloop.methods import METHODS
from train_helpers import allow, toy_snapshot
from training.config import TrainConfig
from training.ppo import PPOConfig, train_ppo
from training.runtime import TrainingRefused
from training.trainer import train

FAST = dict(max_steps=1, batch_size=4, lr=1e-2, device="cpu")
TOO_FEW = dict(method=None, train=False,
               reasons=["not enough data: 499 usable training examples (250 up, 249 down) < 500; no training"])


def test_a_no_training_decision_is_refused_by_train_and_ppo(tiny_reference, tmp_path):
    snapshot = toy_snapshot(tmp_path / "snaps")
    with pytest.raises(TrainingRefused, match=r"decision is no training \(not enough data: 499 .*--force --reason"):
        train(TrainConfig(**FAST), snapshot, tiny_reference, tmp_path / "out", decision=allow(snapshot, **TOO_FEW))
    with pytest.raises(TrainingRefused, match="no training"):
        train_ppo(PPOConfig(max_generated_tokens=4096, device="cpu"), snapshot, tiny_reference, tmp_path / "ppo", None,
                  decision=allow(snapshot, **TOO_FEW))
    assert not (tmp_path / "out").exists() and not (tmp_path / "ppo").exists()


def test_without_a_decision_the_default_rules_decide(tiny_reference, tmp_path):
    """A direct Python call that brings no decision is held to the default rules: 32 examples < 500."""
    snapshot = toy_snapshot(tmp_path / "snaps")
    with pytest.raises(TrainingRefused, match=r"not enough data: 32 usable training examples .* < 500"):
        train(TrainConfig(**FAST), snapshot, tiny_reference, tmp_path / "out")
    with pytest.raises(TrainingRefused, match=r"not enough data: 32 usable"):
        train_ppo(PPOConfig(max_generated_tokens=4096, device="cpu"), snapshot, tiny_reference, tmp_path / "ppo", None)


def test_a_decision_about_another_snapshot_is_refused(tiny_reference, tmp_path):
    mine, other = toy_snapshot(tmp_path / "snaps", "mine"), toy_snapshot(tmp_path / "snaps", "other")
    with pytest.raises(TrainingRefused, match="decision given is about snapshot 'other', not this one"):
        train(TrainConfig(**FAST), mine, tiny_reference, tmp_path / "out", decision=allow(other))


def test_an_ineligible_method_is_refused_and_the_chosen_one_trains(tiny_reference, tmp_path):
    snapshot = toy_snapshot(tmp_path / "snaps")
    no_pairs = allow(snapshot, "kto", eligibility={
        **{m: {"eligible": True, "reason": "eligible"} for m in METHODS},
        "dpo": {"eligible": False, "reason": "only 3 same-prompt pairs (< min_pairs 1000)"}})
    with pytest.raises(TrainingRefused, match=r"dpo is not eligible \(only 3 same-prompt pairs"):
        train(TrainConfig(method="dpo", **FAST), snapshot, tiny_reference, tmp_path / "dpo", decision=no_pairs)
    result = train(TrainConfig(method="kto", **FAST), snapshot, tiny_reference, tmp_path / "kto", decision=no_pairs)
    assert "override" not in result.meta


def test_cli_refuses_in_one_line_and_records_a_forced_override(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """The CLI decides as the loop does (this config's rules, recorded in DuckDB) and passes it on."""
    monkeypatch.setenv("KTOLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    snapshot = toy_snapshot(tmp_path / "snaps")
    assert main(["reference", "pin", str(tiny_model_dir), "--model-version", "tiny-v1"]) == 0
    flags = ["train", "--snapshot", str(snapshot.path), "--max-steps", "1", "--batch-size", "4", "--device", "cpu",
             "--run-id", "forced"]
    capsys.readouterr()
    assert main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "decision is no training (not enough data: 32 usable" in err
    assert main(flags + ["--force"]) == 2
    assert "--force needs --reason" in capsys.readouterr().err
    assert main(flags + ["--force", "--reason", "ablation on a small window"]) == 0
    meta = json.loads((tmp_path / "home" / "models" / "forced" / "training_meta.json").read_text())
    assert meta["override"]["reason"] == "ablation on a small window"
    assert "32 usable" in meta["override"]["refused_because"]
