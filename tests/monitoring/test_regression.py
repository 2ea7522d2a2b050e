"""The paired non-inferiority check: a planted drop fails, noise on a sample passes, an unmeasured drop fails."""

from __future__ import annotations

import random

import pytest

from monitoring.config import MonitorConfig
from monitoring.regression import compare, paired_check


def correct_items(n: int, rate: float, seed: int) -> dict[int, float]:
    rng = random.Random(seed)
    return {i: float(rng.random() < rate) for i in range(n)}


def flip(items: dict[int, float], down: float, up: float, seed: int) -> dict[int, float]:
    """Turn a share ``down`` of the correct items wrong and ``up`` of the wrong items right."""
    rng = random.Random(seed)
    out = {}
    for i, v in items.items():
        if v == 1.0 and rng.random() < down:
            v = 0.0
        elif v == 0.0 and rng.random() < up:
            v = 1.0
        out[i] = v
    return out


def test_planted_drop_on_a_sample_fails_with_the_numbers():
    reference = correct_items(300, 0.6, seed=1)
    candidate = flip(reference, down=0.15, up=0.0, seed=2)  # about 9 points worse
    check = paired_check("piqa", "acc_norm", reference, candidate, tolerance=0.05, sampled=True)
    assert not check.passed
    assert check.drop > 0.05 and check.upper_bound > check.drop
    assert "REGRESSION" in check.describe() and "piqa.acc_norm" in check.describe()


def test_noise_on_a_sample_passes():
    reference = correct_items(300, 0.6, seed=1)
    for seed in range(10):
        # the candidate answers some items differently, but not worse on average
        candidate = flip(reference, down=0.08, up=0.12, seed=100 + seed)
        check = paired_check("piqa", "acc_norm", reference, candidate, tolerance=0.05, sampled=True)
        assert check.passed, check.describe()


def test_the_bound_not_the_estimate_must_stay_under_the_tolerance():
    reference = {i: 1.0 for i in range(1000)}
    slightly_worse = {i: (0.0 if i < 8 else 1.0) for i in range(1000)}  # 0.8 points: bound ~1.3 points
    barely_worse = {i: (0.0 if i < 3 else 1.0) for i in range(1000)}  # 0.3 points: bound ~0.6 points
    assert not paired_check("arc_easy", "acc_norm", reference, slightly_worse, tolerance=0.01, sampled=False).passed
    assert paired_check("arc_easy", "acc_norm", reference, barely_worse, tolerance=0.01, sampled=False).passed


def test_small_samples_use_t_and_one_item_cannot_pass():
    three = paired_check("wikitext2", "bits_per_byte", {0: 1.0, 1: 1.1, 2: 0.9}, {0: 1.004, 1: 1.11, 2: 0.902},
                         tolerance=0.02, sampled=True, higher_is_better=False)
    # t with 2 degrees of freedom (2.92), not the normal 1.645
    assert three.upper_bound == pytest.approx(three.drop + 2.919986 * three.stderr, rel=1e-5)
    assert not paired_check("piqa", "acc_norm", {0: 1.0}, {0: 1.0}, tolerance=0.05, sampled=True).passed


def test_lower_is_better_metrics_and_missing_benchmarks():
    config = MonitorConfig(tolerances={"wikitext2": 0.01})
    reference = {"wikitext2": {"bits_per_byte": {0: 1.00, 1: 1.10}}, "piqa": {"acc_norm": {0: 1.0}}}
    candidate = {"wikitext2": {"bits_per_byte": {0: 1.05, 1: 1.16}}}  # worse: more bits per byte
    result = compare(reference, candidate, sampled=False, config=config)
    assert not result.passed
    assert result.failures[0].benchmark == "wikitext2" and result.failures[0].drop > 0.01
    assert any("piqa: missing" in p for p in result.problems)
    assert "FAILED" in result.summary()


def test_a_true_five_point_drop_is_rejected_at_the_demo_sample_size():
    """The power figures of benchmarks/bench_capability_power.py, small: at the demo's 200 items and the default
    tolerance, a model that truly lost 5 points passes under 5% of draws; an unchanged one mostly passes."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
    from bench_capability_power import simulate

    tolerance = MonitorConfig().tolerance
    assert simulate(200, 0.06, 0.05, tolerance, draws=400, seed=3) <= 0.05
    assert simulate(200, 0.03, 0.0, tolerance, draws=400, seed=4) >= 0.85
