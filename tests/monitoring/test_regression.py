"""The paired regression check: a planted drop fails, noise on a sample passes, full sets use the tolerance."""

from __future__ import annotations

import random

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
    check = paired_check("piqa", "acc_norm", reference, candidate, tolerance=0.01, sampled=True, z=1.645)
    assert not check.passed
    assert check.drop > 0.05 and check.drop > check.allowed_drop
    assert "REGRESSION" in check.describe() and "piqa.acc_norm" in check.describe()


def test_noise_on_a_sample_passes():
    reference = correct_items(300, 0.6, seed=1)
    for seed in range(10):
        # the candidate answers some items differently, but not worse on average
        candidate = flip(reference, down=0.08, up=0.12, seed=100 + seed)
        check = paired_check("piqa", "acc_norm", reference, candidate, tolerance=0.01, sampled=True, z=1.645)
        assert check.passed, check.describe()


def test_full_set_uses_the_plain_tolerance():
    reference = {i: 1.0 for i in range(1000)}
    slightly_worse = {i: (0.0 if i < 15 else 1.0) for i in range(1000)}  # 1.5 points
    barely_worse = {i: (0.0 if i < 5 else 1.0) for i in range(1000)}  # 0.5 points
    assert not paired_check("arc_easy", "acc_norm", reference, slightly_worse, tolerance=0.01, sampled=False,
                            z=1.645).passed
    assert paired_check("arc_easy", "acc_norm", reference, barely_worse, tolerance=0.01, sampled=False,
                        z=1.645).passed


def test_lower_is_better_metrics_and_missing_benchmarks():
    config = MonitorConfig(tolerances={"wikitext2": 0.01})
    reference = {"wikitext2": {"bits_per_byte": {0: 1.00, 1: 1.10}}, "piqa": {"acc_norm": {0: 1.0}}}
    candidate = {"wikitext2": {"bits_per_byte": {0: 1.05, 1: 1.16}}}  # worse: more bits per byte
    result = compare(reference, candidate, sampled=False, config=config)
    assert not result.passed
    assert result.failures[0].benchmark == "wikitext2" and result.failures[0].drop > 0.01
    assert any("piqa: missing" in p for p in result.problems)
    assert "FAILED" in result.summary()
