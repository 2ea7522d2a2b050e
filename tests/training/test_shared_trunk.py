"""The reference from the policy's own forward (LoRA on the top layers leaves the bottom ones shared) is the
reference: the same log-probs as the pinned model, the same training run as with the up-front cache."""

import json

import pytest
import torch

import training.trainer
from train_helpers import allow, toy_snapshot
from training.config import TrainConfig
from training.data import collate, encode_snapshot
from training.logprobs import policy_and_reference_logps, sequence_logps, shared_trunk
from training.modeling import load_model
from training.runtime import make_trainable
from training.trainer import train


def adapted(path, targets: str = "", **lora):
    """A LoRA policy as the trainer makes it, or with adapters on the modules matching ``targets``."""
    model, tokenizer = load_model(path, device="cpu")
    if targets:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=targets, task_type="CAUSAL_LM"))
    else:
        model = make_trainable(model, TrainConfig(device="cpu", lora_dropout=0.0, **lora))
    with torch.no_grad():  # a policy that differs from its reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    return model, tokenizer


@pytest.mark.parametrize("lora, shared", [({"lora_layers": 1}, 1), ({"lora_layers": 0}, 0),
                                          ({"targets": r".*layers\.1\.self_attn\.q_proj"}, 1),
                                          ({"targets": r".*(layers\.1\.self_attn\.q_proj|embed_tokens)"}, 0),
                                          ({"full_finetune": True}, 0)])
def test_the_shared_trunk_is_the_layers_below_the_lowest_adapted_one(lora, shared, tiny_reference):
    assert shared_trunk(adapted(tiny_reference.path, **lora)[0]) == shared


def test_policy_and_reference_from_one_trunk_pass_equal_two_separate_models(tiny_reference, toy):
    policy_model, tokenizer = adapted(tiny_reference.path, lora_layers=1)
    reference_model, _ = load_model(tiny_reference.path, device="cpu")
    data = encode_snapshot(toy, "train", tokenizer, False, 128, 64)
    batch = collate(data, data.sequences(list(range(8))), tokenizer.pad_token_id, torch.device("cpu"))
    policy, reference = policy_and_reference_logps(policy_model, batch, shared_trunk(policy_model))

    assert torch.allclose(reference, sequence_logps(reference_model, batch), atol=1e-5)
    assert torch.allclose(policy, sequence_logps(policy_model, batch), atol=1e-5)
    assert (policy - reference).abs().max() > 0.1  # the adapter matters, so the check above could fail
    policy.sum().backward()  # gradients reach the adapter; the reference carries none
    assert not reference.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in policy_model.named_parameters()
               if "lora_A" in n)


@pytest.mark.parametrize("method, checkpointing", [("kto", False), ("dpo", False), ("kto", True)])
def test_a_shared_trunk_run_trains_exactly_as_the_cached_reference_run(method, checkpointing, tiny_reference,
                                                                     tmp_path, monkeypatch):
    snapshot = toy_snapshot(tmp_path / "snaps")
    config = TrainConfig(method=method, max_steps=3, batch_size=4, lr=1e-2, device="cpu", lora_layers=1,
                         gradient_checkpointing=checkpointing)
    shared = train(config, snapshot, tiny_reference, tmp_path / "trunk", cache_dir=tmp_path / "c1",
                   decision=allow(snapshot))
    monkeypatch.setattr(training.trainer, "shared_trunk", lambda model: 0)  # the up-front cache instead
    cached = train(config, snapshot, tiny_reference, tmp_path / "cached", cache_dir=tmp_path / "c2",
                   decision=allow(snapshot))

    rows = [[json.loads(line) for line in (run.out_dir / "metrics.jsonl").read_text().splitlines()]
            for run in (shared, cached)]
    for key in ("loss", "rewards/margin", "kl", "grad_norm"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-4, abs=1e-5), key
    assert shared.meta["reference_logps"] == {"shared_layers": 1, "source": "step"}
    assert cached.meta["reference_logps"] == {"shared_layers": 0, "source": "cache"}
    assert shared.eval["scores"] == cached.eval["scores"]
    assert shared.eval["loss"] == pytest.approx(cached.eval["loss"], rel=1e-4)
