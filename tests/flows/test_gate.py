"""The promotion gate: a paired one-sided test on held-out preferences (pure), and noise that must not pass it."""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import pytest
import torch
from scipy import stats

from flows.gate import paired_test, proportion_test, verdict
from monitoring.regression import RegressionResult

sys.path.insert(0, str(Path(__file__).parents[1] / "training"))
from train_helpers import write_snapshot  # noqa: E402

PASS = RegressionResult(True, [])


def test_the_bound_is_the_one_sided_t_bound_of_the_mean_paired_gain():
    candidate = [1, 1, 0, 1, 0.5, 1, 1, 0, 1, 1]
    incumbent = [0.5] * 10
    test = paired_test(candidate, incumbent, form="pairs", confidence=0.95)
    diffs = [c - 0.5 for c in candidate]
    mean = sum(diffs) / 10
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 9 / 10)
    assert test.gain == pytest.approx(mean) and test.stderr == pytest.approx(se)
    assert test.lower_bound == pytest.approx(mean - stats.t.ppf(0.95, 9) * se)
    assert test.n == 10 and test.candidate == pytest.approx(0.75) and test.incumbent == 0.5
    assert test.passed == (test.lower_bound > 0)


def test_a_gain_at_the_noise_floor_is_rejected_and_a_clear_one_promoted():
    n = 300
    tiny_gain = [1.0 if i % 2 == 0 else 0.0 for i in range(n)]
    tiny_gain[1] = 1.0  # 151 right of 300: a +0.003 gain the old "any gain" rule promoted
    noisy = paired_test(tiny_gain, [0.5] * n, form="pairs")
    assert noisy.gain > 0 and not noisy.passed
    clear = paired_test([1.0 if i % 5 else 0.0 for i in range(n)], [0.5] * n, form="pairs")  # 80% right
    assert clear.passed and clear.lower_bound > 0.25
    gate = verdict(clear, PASS, None, "the reference")
    assert gate.passed and gate.summary.startswith("PROMOTE")
    assert "paired t test, n=300" in gate.summary and "95% lower bound" in gate.summary
    assert "significantly better" in gate.summary


def test_ties_everywhere_never_pass_and_a_guard_stop_or_regression_rejects():
    tie = paired_test([0.5] * 50, [0.5] * 50, form="thumbs")
    assert tie.gain == 0 and tie.stderr == 0 and not tie.passed
    clear = paired_test([1.0] * 50, [0.5] * 50, form="pairs")
    assert clear.passed
    assert not verdict(clear, PASS, None, "the reference", {"reason": "kl bound"}).passed
    assert not verdict(clear, RegressionResult(False, [], ["arc_easy: missing"]), None, "x").passed


def test_scores_must_cover_the_same_examples():
    with pytest.raises(Exception, match="same snapshot split"):
        paired_test([1.0, 0.0], [0.5], form="pairs")


def test_the_live_bound_is_the_one_sided_wald_bound_of_the_rate_difference():
    test = proportion_test(90, 300, 60, 300, confidence=0.95)
    se = math.sqrt(0.3 * 0.7 / 300 + 0.2 * 0.8 / 300)
    assert test.gain == pytest.approx(0.1) and test.stderr == pytest.approx(se)
    assert test.lower_bound == pytest.approx(0.1 - stats.norm.ppf(0.95) * se) and test.passed
    assert "canary 0.300 (n=300) vs serving 0.200 (n=300)" in test.describe()


def test_a_live_gain_within_noise_or_below_the_minimum_is_not_enough():
    assert not proportion_test(64, 300, 60, 300).passed  # +1.3 points on 300 ratings each: noise
    assert proportion_test(90, 300, 60, 300).passed
    assert not proportion_test(90, 300, 60, 300, min_gain=0.05).passed  # bound +0.042 <= the required +0.05
    assert not proportion_test(0, 100, 0, 100).passed and not proportion_test(100, 100, 100, 100).passed
    assert proportion_test(100, 100, 0, 100).passed  # SE 0, but a real gain
    with pytest.raises(Exception, match="rated answers of both"):
        proportion_test(3, 10, 0, 0)


def test_canary_events_is_off_or_enough_for_the_normal_approximation():
    from flows.config import LoopConfig
    from ktoloop.config import ConfigError

    assert LoopConfig().canary_events == 0 and LoopConfig(canary_events=200).canary_events == 200
    for bad in (-1, 10):
        with pytest.raises(ConfigError, match="flows.canary_events"):
            LoopConfig(canary_events=bad)


WORDS = ("river stone bread quiet music paper silver window garden winter orange market letter candle forest "
         "bridge yellow pocket basket island").split()


def exchangeable_pairs_snapshot(root: Path, n: int = 80):
    """Held-out pairs whose chosen and rejected answers are drawn from one distribution: nothing to learn, so
    a perturbed model ranks each pair right with probability 1/2 (chosen/rejected are exchangeable)."""
    rng = random.Random(0)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."

    rows = [{"prompt": f"Say something about {rng.choice(WORDS)} number {i}.", "chosen": sentence(),
             "rejected": sentence()} for i in range(n)]
    thumbs = [r for row in rows for r in ({"prompt": row["prompt"], "completion": row["chosen"], "label": True},
                                          {"prompt": row["prompt"], "completion": row["rejected"], "label": False})]
    return write_snapshot(root, "noise", kto_train=thumbs[:8], kto_eval=thumbs, pairs_train=rows[:4], pairs_eval=rows)


@pytest.mark.slow
def test_random_noise_adapters_are_not_promoted(tiny_model_dir, tmp_path):
    """An untrained LoRA with random N(0, 0.03) weights on q/k/v/o moves the log-probs but learns nothing:
    the old rule (any lower held-out loss) promoted 3 of 8 such; the paired bound must reject them.
    (Held-out pairs that all share one template would not do: a random direction then favours the same
    template in every pair, and the pairs are not independent examples.)"""
    from peft import LoraConfig, get_peft_model

    from training.config import TrainConfig
    from training.evaluate import evaluate_preference, reference_score
    from training.modeling import load_model
    from training.reference import pin_reference

    tiny_reference = pin_reference(tiny_model_dir, "tiny-v1", tmp_path / "home")
    snapshot = exchangeable_pairs_snapshot(tmp_path / "snaps")
    config = TrainConfig(method="kto", device="cpu", max_length=64, max_prompt_length=32)
    reference = reference_score(snapshot, config)
    assert reference.accuracy == 0.5 and set(reference.scores) == {0.5} and len(reference.scores) == 80
    promoted = 0
    for seed in range(8):
        torch.manual_seed(seed)
        base, tokenizer = load_model(tiny_reference.path, device="cpu")
        model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                     "o_proj"]))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.normal_(0, 0.03)
        score = evaluate_preference(model, tokenizer, snapshot, tiny_reference, config, cache_dir=tmp_path / "cache")
        assert score.form == "pairs" and len(score.scores) == 80
        promoted += paired_test(score.scores, reference.scores, form=score.form).passed
    assert promoted <= 1  # at a 5% one-sided level, 2+ of 8 would happen by chance 5.7% of the time


@pytest.mark.slow
def test_calibration_shuffled_labels_rarely_promote_and_a_planted_preference_does(tiny_model_dir, tmp_path):
    """The small version of ``benchmarks/bench_gate.py`` (20 runs per condition, README): 4 seeds each."""
    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_gate import VERSION, gate_run

    from training.reference import pin_reference

    reference = pin_reference(tiny_model_dir, VERSION, tmp_path / "home")
    shuffled = [gate_run(reference, tmp_path / f"s{seed}", seed, shuffled=True, n_prompts=200) for seed in range(4)]
    planted = [gate_run(reference, tmp_path / f"p{seed}", seed, shuffled=False, n_prompts=200) for seed in range(4)]
    # at a calibrated 5% level, 2+ false promotions of 4 happen 1.4% of the time
    assert sum(t.passed for t in shuffled) <= 1, [t.describe() for t in shuffled]
    assert sum(t.passed for t in planted) >= 3, [t.describe() for t in planted]
