"""End-to-end training on a tiny real Llama (2 layers, 16 wide, SmolLM2 tokenizer) and a toy snapshot."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ktoloop.cli import main
from ktoloop.errors import KtoLoopError
from train_helpers import SMALL_GATES, allow, toy_snapshot
from training.config import TrainConfig
from training.data import encode_snapshot
from training.evaluate import evaluate_preference
from training.modeling import load_model
from training.reference import pin_reference
from training.trainer import _plan, train

FAST = dict(batch_size=4, lr=1e-2, device="cpu")


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["kto", "dpo", "ipo"])
def test_each_method_end_to_end(method, tiny_reference, tiny_model_dir, tmp_path):
    snapshot = toy_snapshot(tmp_path / "snaps", kto_weights={"desirable": 1.5, "undesirable": 0.5})
    # IPO also covers gradient checkpointing (same numbers expected, recomputed activations)
    config = TrainConfig(method=method, max_steps=3, gradient_checkpointing=method == "ipo", **FAST)
    result = train(config, snapshot, tiny_reference, tmp_path / "out", cache_dir=tmp_path / "cache",
                   decision=allow(snapshot))

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, str(tmp_path / "out"))
    assert any(n.endswith("lora_B.default.weight") and p.abs().sum() > 0 for n, p in model.named_parameters())

    meta = json.loads((tmp_path / "out" / "training_meta.json").read_text())
    assert meta == result.meta
    assert meta["snapshot"]["content_sha256"] == snapshot.manifest.content_sha256
    assert meta["reference"]["sha256"] == tiny_reference.sha256
    assert meta["config"]["method"] == method and meta["steps"] == 3
    # every method is scored on the 8 held-out pairs (the gate's one form), the reference tying at 1/2
    assert meta["eval"]["examples"] == 8 and meta["eval"]["form"] == "pairs" and len(meta["eval"]["scores"]) == 8
    rows = metrics(tmp_path / "out")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows)
    # Step 1: the policy is the reference (LoRA B = 0), so each loss has a known value.
    if method == "kto":
        first_rows = _plan(32, config, 1, True).step(0, 0)[0][0]
        labels = snapshot.kto("train")["label"].to_list()
        expected = sum(0.5 * (1.5 if labels[r] else 0.5) for r in first_rows) / len(first_rows)
    else:
        expected = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2}[method]
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_kto_raises_heldout_reward_of_desirable_completions(tiny_reference, toy, tmp_path):
    config = TrainConfig(method="kto", epochs=1, **FAST)
    base, tok = load_model(tiny_reference.path, device="cpu")
    before = evaluate_preference(base, tok, toy, tiny_reference, config, cache_dir=tmp_path / "cache")
    assert abs(before.reward_margin) < 1e-4                            # untrained policy == reference

    result = train(config, toy, tiny_reference, tmp_path / "out", cache_dir=tmp_path / "cache", decision=allow(toy))
    after = result.eval
    assert after["split"] == "eval" and after["examples"] == 8      # held-out topic pairs, never trained on
    assert after["reward_margin"] > 0.05
    assert after["reward_chosen"] > 0 > after["reward_rejected"]
    assert after["accuracy"] >= 0.75
    # the flows' path: load the written adapter merged, score it again, same numbers
    merged, tok = load_model(tiny_reference.path, adapter_dir=tmp_path / "out", device="cpu")
    again = evaluate_preference(merged, tok, toy, tiny_reference, config, cache_dir=tmp_path / "cache")
    assert again.reward_margin == pytest.approx(after["reward_margin"], rel=1e-3)


@pytest.mark.slow
def test_resume_continues_to_the_same_result(tiny_reference, toy, tmp_path):
    config = TrainConfig(method="kto", max_steps=6, checkpoint_every=3, lora_dropout=0.1, **FAST)
    full = tmp_path / "full"
    train(config, toy, tiny_reference, full, cache_dir=tmp_path / "cache", decision=allow(toy))
    assert [p.name for p in (full / "checkpoints").iterdir()] == ["step-000003"]

    # A crash after step 6 but before the final save: resume must redo steps 4-6 from checkpoint 3.
    crashed = shutil.copytree(full, tmp_path / "crashed")
    for name in ("training_meta.json", "adapter_model.safetensors", "adapter_config.json"):
        (crashed / name).unlink()
    with pytest.raises(KtoLoopError, match="another training config"):
        train(TrainConfig(method="kto", max_steps=7, checkpoint_every=3, lora_dropout=0.1, **FAST), toy,
              tiny_reference, crashed, cache_dir=tmp_path / "cache", resume=True, decision=allow(toy))
    train(config, toy, tiny_reference, crashed, cache_dir=tmp_path / "cache", resume=True, decision=allow(toy))

    a, b = load_file(full / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(crashed)) == strip(metrics(full))
    # and resuming is not a no-op that happens to match: from scratch with another seed differs
    other = train(TrainConfig(method="kto", max_steps=6, seed=1, lora_dropout=0.1, **FAST), toy, tiny_reference,
                  tmp_path / "other", cache_dir=tmp_path / "cache", decision=allow(toy))
    c = load_file(other.out_dir / "adapter_model.safetensors")
    assert not all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.slow
def test_full_finetune_reuses_the_reference_cache(tiny_reference, toy, tmp_path):
    cache = tmp_path / "cache"
    train(TrainConfig(method="dpo", max_steps=2, **FAST), toy, tiny_reference, tmp_path / "lora", cache_dir=cache,
          decision=allow(toy))
    files = {p: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(files) == 1                               # one content-addressed file per reference
    result = train(TrainConfig(method="dpo", max_steps=2, full_finetune=True, **FAST), toy, tiny_reference,
                   tmp_path / "full", cache_dir=cache, decision=allow(toy))
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == files  # nothing recomputed or rewritten
    assert result.meta["adapter"] == "full"
    tuned, _ = load_model(tmp_path / "full", device="cpu")
    base, _ = load_model(tiny_reference.path, device="cpu")
    assert not torch.equal(tuned.model.layers[0].self_attn.q_proj.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_refuses_changed_reference_and_foreign_snapshot(tiny_model_dir, toy, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "model")
    ref = pin_reference(model, "tiny-v1", tmp_path / "home")
    other = toy_snapshot(tmp_path / "snaps", model_version="prod-v7")
    with pytest.raises(KtoLoopError, match=r"'prod-v7'.*'tiny-v1'"):
        train(TrainConfig(max_steps=1, **FAST), other, ref, tmp_path / "out", decision=allow(other))
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:-1] + b"\x07")
    with pytest.raises(KtoLoopError, match="model.safetensors changed"):
        train(TrainConfig(max_steps=1, **FAST), toy, ref, tmp_path / "out", decision=allow(toy))
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cli_sweep_trains_each_beta_and_keeps_the_best(tiny_model_dir, toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KTOLOOP_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ktoloop.toml").write_text(SMALL_GATES)
    assert main(["reference", "pin", str(tiny_model_dir), "--model-version", "tiny-v1"]) == 0
    assert main(["train", "--snapshot", str(toy.path), "--method", "dpo", "--sweep-beta", "0.05,0.3",
                 "--max-steps", "2", "--batch-size", "4", "--lr", "0.01", "--device", "cpu",
                 "--run-id", "sweep"]) == 0
    out = tmp_path / "home" / "models" / "sweep"
    meta = json.loads((out / "training_meta.json").read_text())
    assert [r["beta"] for r in meta["sweep"]] == [0.05, 0.3]
    best = max(meta["sweep"], key=lambda r: (r["eval"]["accuracy"], -r["eval"]["loss"]))
    assert meta["best_beta"] == best["beta"] == meta["config"]["beta"]
    assert (out / "adapter_model.safetensors").read_bytes() == \
        (out / f"beta-{best['beta']:g}" / "adapter_model.safetensors").read_bytes()
    assert list((tmp_path / "home" / "cache").glob("reflogps-*.pt"))  # shared cache under <home>/cache
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["best_beta"] == meta["best_beta"]


@pytest.mark.slow
def test_two_processes_give_the_same_loss_as_one(tiny_reference, toy, tmp_path):
    worker = Path(__file__).parent / "dist_worker.py"
    pin_home = tmp_path / "home"  # where the tiny_reference fixture pinned it
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def run(nproc: int, batch: int, out: Path) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(worker), str(toy.path), str(pin_home), str(out), str(batch)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]

    run(1, 4, tmp_path / "one")
    run(2, 2, tmp_path / "two")
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "kl", "rewards/margin", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    assert one[0]["kl"] < 1e-5 < one[-1]["kl"]                   # z is exercised, not trivially zero
    wa, wb = load_file(tmp_path / "one" / "adapter_model.safetensors"), load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[r] for r in b) * len(b) - sum(lengths[r] for r in b) for b in batches)


def test_length_grouped_batches_cover_each_epoch_once_with_less_padding():
    lengths = [5 + (i * 37) % 120 for i in range(256)]
    config = TrainConfig(method="kto", batch_size=8, group_by_length=True, device="cpu")
    plan, plain = _plan(256, config, 1, True, lengths), _plan(256, TrainConfig(batch_size=8, device="cpu"), 1, True)

    batches = [plan.step(s, 0)[0][0] for s in range(plan.steps_per_epoch)]
    assert sorted(r for b in batches for r in b) == list(range(256))  # every example once per epoch
    assert padding(batches, lengths) < padding([plain.step(s, 0)[0][0] for s in range(32)], lengths) / 4
    assert plan.order(0) == _plan(256, config, 1, True, lengths).order(0) != plan.order(1)  # seeded per epoch


def test_length_grouping_keeps_each_batchs_share_of_thumbs_up_when_length_predicts_the_label():
    """Short answers liked (1 in 4): grouping by length alone would give one-label batches; KTO's grouping
    gives every batch its 2 of 8 thumbs up (give or take one) and still cuts the padding."""
    lengths = [5 + (i * 37) % 120 for i in range(256)]
    labels = [length < 35 for length in lengths]
    config = TrainConfig(method="kto", batch_size=8, group_by_length=True, device="cpu")
    plan = _plan(256, config, 1, True, lengths, labels)
    batches = [plan.step(s, 0)[0][0] for s in range(plan.steps_per_epoch)]
    assert sorted(r for b in batches for r in b) == list(range(256))
    share = sum(labels) / 256 * 8
    assert all(abs(sum(labels[r] for r in b) - round(share)) <= 1 for b in batches)
    unlabelled = _plan(256, config, 1, True, lengths)
    assert max(sum(labels[r] for r in unlabelled.step(s, 0)[0][0]) for s in range(32)) == 8  # one-label batches
    plain = _plan(256, TrainConfig(batch_size=8, device="cpu"), 1, True)
    assert padding(batches, lengths) < 0.7 * padding([plain.step(s, 0)[0][0] for s in range(32)], lengths)


def test_a_kl_subset_scores_only_its_pairs_and_step_one_is_still_exact(tiny_model_dir, toy, tmp_path):
    """kl_pairs=2 of batch 8: the run scores 2 mismatched pairs per micro-batch (reference cache included),
    and at step 1 (policy = reference) every KTO loss is still exactly lambda * 0.5."""
    config = TrainConfig(method="kto", max_steps=2, batch_size=8, kl_pairs=2, lr=1e-2, device="cpu",
                         group_by_length=True)
    plan = _plan(32, config, 1, True, [1] * 32)
    assert all(len(kl) == 2 for _, kl in plan.step(0, 0))
    assert len(plan.all_pairs(encode_snapshot(toy, "train", load_model(tiny_model_dir, device="cpu")[1], False,
                                              config.max_length, config.max_prompt_length))) == 16 + 2 * 2
    ref = pin_reference(tiny_model_dir, "tiny-v1", tmp_path / "home")
    result = train(config, toy, ref, tmp_path / "out", cache_dir=tmp_path / "cache", decision=allow(toy))
    first = metrics(tmp_path / "out")[0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-5) and first["loss"] == pytest.approx(0.5, rel=1e-4)
    assert result.meta["config"]["kl_pairs"] == 2
