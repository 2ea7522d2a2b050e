"""PPO on tiny Llamas: a toy reward (count of one target token) rises under the KL bound; budget, guards, resume."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ktoloop.cli import main
from ktoloop.config import ConfigError
from ktoloop.errors import KtoLoopError
from train_helpers import SMALL_GATES, allow
from training.ppo import Budget, HackingGuard, PPOConfig, gae, kl_penalised_rewards, ppo_loss, train_ppo
from training.reference import pin_reference

pytestmark = pytest.mark.slow  # PPO runs: rollouts, updates, evaluations

# The reward is learnable by a 16-wide model only if its output can move: LoRA on lm_head too, high lr.
LEARN = dict(rollout_batch_size=16, mini_batch_size=8, ppo_epochs=2, max_new_tokens=8, lr=2e-2, kl_coef=0.05,
             lora_r=8, lora_alpha=16, lora_target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "lm_head"],
             eval_every=0, device="cpu")
SMALL = dict(rollout_batch_size=8, mini_batch_size=4, ppo_epochs=1, max_new_tokens=6, lr=1e-2, eval_every=0,
             device="cpu")


@pytest.fixture(scope="module")
def peaked(tiny_model_dir, tmp_path_factory):
    """The tiny model with embeddings x40, so its next-token distribution is peaked enough to sample a target
    token often; the target is its most likely first answer token. Returns (reference, home, target)."""
    root = tmp_path_factory.mktemp("peaked")
    model = shutil.copytree(tiny_model_dir, root / "model")
    weights = {k: v * 40 if "embed" in k else v for k, v in load_file(model / "model.safetensors").items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    home = root / "home"
    reference = pin_reference(model, "tiny-v1", home)
    from training.data import render_prompt
    from training.modeling import load_model

    lm, tok = load_model(model, device="cpu")
    with torch.no_grad():
        target = int(lm(torch.tensor([render_prompt(tok, "Tell me about tea.")])).logits[0, -1].argmax())
    return reference, home, target


def counter(target: int):
    def target_count(prompts, completions):
        return torch.tensor([float(sum(t == target for t in c)) for c in completions])
    return target_count


def rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_toy_reward_rises_under_the_kl_bound_within_the_token_budget(peaked, toy, tmp_path):
    reference, _, target = peaked
    config = PPOConfig(max_generated_tokens=4 * 16 * 8 + 100, kl_bound=20.0, **LEARN)
    result = train_ppo(config, toy, reference, tmp_path / "out", counter(target), cache_dir=tmp_path / "cache",
                       decision=allow(toy))

    assert result.stop == {"reason": "budget_tokens", "detail": result.stop["detail"], "guard": False, "step": 4}
    metrics = rows(tmp_path / "out")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[-1]["tokens_total"] <= config.max_generated_tokens == result.meta["budget"]["max_generated_tokens"]
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)        # first rollout: the policy is the reference
    assert metrics[-1]["reward"] > 1.5 * metrics[0]["reward"] + 0.5
    assert all(m["kl"] < config.kl_bound for m in metrics)
    # a candidate like any other: adapter, training_meta.json with lineage, held-out preference score
    meta = json.loads((tmp_path / "out" / "training_meta.json").read_text())
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert meta["config"]["method"] == "ppo" and meta["adapter"] == "lora"
    assert meta["reference"]["sha256"] == reference.sha256
    assert meta["snapshot"]["content_sha256"] == toy.manifest.content_sha256
    assert meta["reward"] == {"kind": "function", "name": "target_count"}
    assert meta["eval"]["method"] == "dpo" and meta["eval"]["examples"] == 8
    assert meta["rollouts"]["first"]["reward"] == metrics[0]["reward"]
    # before/after on the 8 held-out prompts: the reference's samples vs the policy's, same seed
    heldout = meta["heldout_reward"]
    assert heldout["prompts"] == 8 and heldout["policy_reward"] > heldout["reference_reward"] + 0.5
    assert heldout["gain"] == pytest.approx(heldout["policy_reward"] - heldout["reference_reward"], abs=1e-5)
    assert 0.5 < heldout["policy_kl"] < config.kl_bound


def test_the_final_policy_is_held_to_the_kl_bound_on_heldout_prompts(peaked, toy, tmp_path):
    reference, _, target = peaked
    # one update, then the budget is spent: only the held-out check sees the policy after that update
    config = PPOConfig(max_generated_tokens=16 * 8, kl_bound=0.01, **LEARN)
    result = train_ppo(config, toy, reference, tmp_path / "out", counter(target), cache_dir=tmp_path / "cache",
                       decision=allow(toy))
    assert rows(tmp_path / "out")[0]["kl"] < config.kl_bound  # the one rollout was the reference itself
    assert result.stop["reason"] == "kl_bound" and result.stop["guard"] is True
    assert result.stop["detail"].startswith("after the last update, on held-out prompts: KL to the reference")


def test_kl_bound_stops_and_flags_the_run(peaked, toy, tmp_path):
    reference, _, target = peaked
    config = PPOConfig(max_generated_tokens=100_000, max_steps=8, kl_bound=0.5, **LEARN)
    result = train_ppo(config, toy, reference, tmp_path / "out", counter(target), cache_dir=tmp_path / "cache",
                       decision=allow(toy))
    assert result.stop["reason"] == "kl_bound" and result.stop["guard"] is True
    assert "exceeds ppo.kl_bound 0.5" in result.stop["detail"]
    last = rows(tmp_path / "out")[-1]
    assert last["kl"] > 0.5 and "policy_loss" not in last        # stopped before updating on that rollout
    assert result.meta["steps"] == last["step"] - 1 < 8


def test_time_budget_stops_before_a_first_step_that_would_overrun(peaked, toy, tmp_path):
    """The first step used to start on any budget (no estimate = 0 s) and overran 0.05 s by a whole step."""
    reference, _, target = peaked
    config = PPOConfig(max_seconds=0.05, **SMALL)
    result = train_ppo(config, toy, reference, tmp_path / "out", counter(target), cache_dir=tmp_path / "cache",
                       decision=allow(toy))
    assert result.stop["reason"] == "budget_seconds" and result.stop["guard"] is False
    assert result.meta["steps"] == 0 and not (tmp_path / "out" / "metrics.jsonl").exists()  # no step started
    bound = result.meta["budget"]["step_seconds_bound"]  # the dry step's time: longer than the whole budget
    assert bound > config.max_seconds and f"the next step may take {bound:.2f} s" in result.stop["detail"]
    assert result.meta["budget"]["seconds"] == 0.0 and result.meta["budget"]["generated_tokens"] == 0
    # the dry step was undone: the saved adapter is the untrained one (LoRA B starts at zero)
    adapter = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(not v.any() for k, v in adapter.items() if "lora_B" in k)


def test_a_time_budget_changes_where_the_run_stops_not_what_it_computes(peaked, toy, tmp_path):
    reference, _, target = peaked
    runs = {}
    for name, budget in (("tokens", {}), ("tokens+seconds", {"max_seconds": 1e6})):
        config = PPOConfig(max_generated_tokens=100_000, max_steps=2, **budget, **SMALL)
        runs[name] = train_ppo(config, toy, reference, tmp_path / name, counter(target), cache_dir=tmp_path / "c",
                               decision=allow(toy))
    assert [r.stop["reason"] for r in runs.values()] == ["max_steps", "max_steps"]
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("seconds")} for m in ms]  # noqa: E731
    assert strip(rows(tmp_path / "tokens")) == strip(rows(tmp_path / "tokens+seconds"))  # same RNG, same weights
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_budget_holds_the_next_step_to_the_slowest_seen_and_never_guesses_zero():
    config = PPOConfig(max_seconds=10.0, **SMALL)
    budget = Budget(max_tokens=0, max_seconds=10.0)
    with pytest.raises(KtoLoopError, match="cannot bound its next step"):
        budget.exhausted(config, elapsed=0.0, evaluates=False)
    budget.observe(3.0)                     # the dry step
    budget.observe(1.0, eval_seconds=2.0)   # a faster step, then a held-out evaluation
    assert budget.next_step_seconds(evaluates=False) == 3.0 and budget.next_step_seconds(evaluates=True) == 5.0
    assert budget.exhausted(config, elapsed=6.5, evaluates=False) is None             # 6.5 + 3 fits in 10
    assert budget.exhausted(config, elapsed=6.5, evaluates=True) == "budget_seconds"  # 6.5 + 3 + 2 does not
    resumed = Budget(max_tokens=0, max_seconds=10.0, seconds=7.5)  # spent before a --resume counts
    resumed.observe(3.0)
    assert resumed.exhausted(config, elapsed=0.0, evaluates=False) == "budget_seconds"


def test_budget_config(peaked, toy, tmp_path):
    reference, _, target = peaked
    with pytest.raises(ConfigError, match="compute budget"):
        train_ppo(PPOConfig(**SMALL), toy, reference, tmp_path / "none", counter(target), decision=allow(toy))
    with pytest.raises(ConfigError, match=r"ppo.max_generated_tokens \(10\) is below one rollout"):
        PPOConfig(max_generated_tokens=10, **SMALL)
    with pytest.raises(ConfigError, match="ppo.mini_batch_size"):
        PPOConfig(max_generated_tokens=1000, **{**SMALL, "mini_batch_size": 16})


def test_resume_continues_to_the_same_result(peaked, toy, tmp_path):
    reference, _, target = peaked
    config = PPOConfig(max_generated_tokens=100_000, max_steps=4, checkpoint_every=2, **SMALL)
    full = tmp_path / "full"
    train_ppo(config, toy, reference, full, counter(target), cache_dir=tmp_path / "cache", decision=allow(toy))
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    crashed = shutil.copytree(full, tmp_path / "crashed")
    shutil.rmtree(crashed / "checkpoints" / "step-000004")
    for name in ("training_meta.json", "adapter_model.safetensors", "adapter_config.json"):
        (crashed / name).unlink()
    with pytest.raises(KtoLoopError, match="another ppo config"):
        train_ppo(PPOConfig(max_generated_tokens=100_000, max_steps=4, checkpoint_every=2, **{**SMALL, "lr": 2e-2}),
                  toy, reference, crashed, counter(target), resume=True, decision=allow(toy))
    result = train_ppo(config, toy, reference, crashed, counter(target), cache_dir=tmp_path / "cache", resume=True,
                       decision=allow(toy))

    a, b = load_file(full / "adapter_model.safetensors"), load_file(crashed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda ms: [{k: v for k, v in m.items() if not k.startswith("seconds")} for m in ms]  # noqa: E731
    assert strip(rows(crashed)) == strip(rows(full))
    assert result.meta["budget"]["generated_tokens"] == rows(full)[-1]["tokens_total"]  # spent before the crash counts


def test_gae_and_rewards_by_hand():
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_penalised_rewards(torch.tensor([2.0]), torch.tensor([[-1.0, -2.0, -9.0]]),
                                       torch.tensor([[-1.5, -2.0, -1.0]]), mask, kl_coef=0.1)
    assert kl.tolist() == [[0.5, 0.0, 0.0]]                         # the padding position is not counted
    assert rewards[0].tolist() == pytest.approx([-0.05, 2.0, 0.0])  # the score lands on the last real token
    values = torch.tensor([[0.5, 1.0, 7.0]])
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.5)
    delta1 = 2.0 - 1.0
    delta0 = -0.05 + 1.0 - 0.5
    assert advantages[0].tolist() == pytest.approx([delta0 + 0.5 * delta1, delta1, 0.0])
    assert returns[0].tolist() == pytest.approx([delta0 + 0.5 * delta1 + 0.5, 2.0, 0.0])


def test_ppo_loss_at_ratio_one_is_minus_the_mean_advantage():
    config = PPOConfig(max_generated_tokens=1000, **SMALL)
    logps = torch.tensor([[-1.0, -2.0]])
    advantages, mask = torch.tensor([[1.0, -3.0]]), torch.ones(1, 2)
    loss, stats = ppo_loss(logps, torch.zeros(1, 2), logps, torch.zeros(1, 2), advantages, torch.zeros(1, 2), mask,
                           config)
    assert stats["policy_loss"] == pytest.approx(1.0) and stats["value_loss"] == 0 and stats["clipfrac"] == 0


def test_hacking_guard_trips_when_reward_rises_while_heldout_accuracy_falls():
    guard = HackingGuard(kl_bound=5.0, accuracy_drop=0.05)
    assert guard.check_kl(4.9) is None and "exceeds ppo.kl_bound 5.0" in guard.check_kl(5.1)
    assert guard.check_eval(10, reward=1.0, accuracy=0.80, examples=1000) is None
    assert guard.check_eval(20, reward=0.9, accuracy=0.70, examples=1000) is None  # accuracy fell, so did reward
    assert guard.check_eval(30, reward=1.5, accuracy=0.78, examples=1000) is None  # within accuracy_drop
    assert guard.check_eval(40, reward=1.6, accuracy=0.68, examples=32) is None    # within 2 SE of 32 pairs
    why = guard.check_eval(50, reward=2.0, accuracy=0.60, examples=1000)
    assert "reward rose (1.0000 at step 10 -> 2.0000)" in why and "0.800 -> 0.600" in why


def test_cli_ppo_uses_the_pinned_reward_model_for_the_reference(peaked, toy, tmp_path, monkeypatch, capsys):
    reference, _, _ = peaked
    home = tmp_path / "home"
    monkeypatch.setenv("KTOLOOP_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ktoloop.toml").write_text(SMALL_GATES)
    assert main(["reference", "pin", reference.path, "--model-version", "tiny-v1"]) == 0
    flags = ["--max-generated-tokens", "48", "--rollout-batch-size", "8", "--mini-batch-size", "4",
             "--max-new-tokens", "6", "--device", "cpu"]
    assert main(["ppo", "--snapshot", str(toy.path), *flags]) == 2
    assert "no reward model trained for reference 'tiny-v1'" in capsys.readouterr().err
    assert main(["reward", "train", "--snapshot", str(toy.path), "--max-steps", "2", "--batch-size", "4",
                 "--device", "cpu", "--run-id", "rm"]) == 0
    capsys.readouterr()
    assert main(["ppo", "--snapshot", str(toy.path), *flags, "--run-id", "p"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{"):])["stop"]["reason"] == "budget_tokens"
    meta = json.loads((home / "models" / "p" / "training_meta.json").read_text())
    assert meta["reward"]["kind"] == "reward_model" and meta["reward"]["name"] == "rm"
    assert meta["steps"] == 1 and meta["budget"]["generated_tokens"] <= 48
