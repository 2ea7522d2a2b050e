"""The promotion gate as pure functions: a paired significance test on held-out preferences, and the verdict.

A candidate is promoted only when, scored against the serving model on the same held-out examples, the
one-sided lower confidence bound of its mean per-example gain exceeds ``flows.min_preference_gain``, and no
capability benchmark regresses (``monitoring.regression``). A gain at the noise floor is not a gain.

That held-out test scores the candidate on the serving model's logged answers. What users get is the
candidate's own answers: with ``[flows] canary_events``, a candidate that passes it first serves a share of
traffic as a canary and replaces the serving model only when its live thumbs-up rate is significantly higher
(``proportion_test``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scipy import stats

from ktoloop.errors import KtoLoopError

FORMS = {"pairs": "held-out pair accuracy", "thumbs": "held-out thumbs accuracy"}


def _gain_and_verdict(test: PreferenceTest | LiveTest) -> str:
    """The part of a gate line both tests share: the gain, its bound against the minimum, and the verdict."""
    verdict = "significantly better" if test.passed else "not significantly better"
    return (f"gain {test.gain:+.3f} ± {test.stderr:.3f} SE, {test.confidence:.0%} lower bound "
            f"{test.lower_bound:+.3f} {'>' if test.passed else '<='} {test.min_gain:+.3f}: {verdict}")


@dataclass(frozen=True)
class PreferenceTest:
    """Paired one-sided t test of the per-example gain (candidate score minus incumbent score)."""

    form: str
    n: int
    candidate: float
    incumbent: float
    gain: float
    stderr: float
    lower_bound: float
    """One-sided lower confidence bound of the mean gain at ``confidence``."""
    min_gain: float
    confidence: float
    passed: bool

    def describe(self) -> str:
        return (f"{FORMS.get(self.form, self.form)} (ties 1/2), paired t test, n={self.n}: candidate "
                f"{self.candidate:.3f} vs {self.incumbent:.3f}, " + _gain_and_verdict(self))


def paired_test(candidate: Sequence[float], incumbent: Sequence[float], *, form: str, min_gain: float = 0.0,
                confidence: float = 0.95) -> PreferenceTest:
    """Both sequences score the same examples in the same order (``PreferenceScore.scores``)."""
    n = len(candidate)
    if n != len(incumbent):
        raise KtoLoopError(f"the candidate scored {n} held-out examples and the incumbent {len(incumbent)}: "
                           "they must be scored on the same snapshot split")
    if n < 2:
        raise KtoLoopError(f"{n} held-out example(s): too few to test a gain; raise dataset.holdout_fraction")
    diffs = [c - i for c, i in zip(candidate, incumbent)]
    gain = sum(diffs) / n
    stderr = math.sqrt(sum((d - gain) ** 2 for d in diffs) / (n - 1) / n)
    bound = gain - float(stats.t.ppf(confidence, n - 1)) * stderr
    return PreferenceTest(form, n, sum(candidate) / n, sum(incumbent) / n, gain, stderr, bound, min_gain,
                          confidence, passed=bound > min_gain)


@dataclass(frozen=True)
class LiveTest:
    """One-sided test of the difference of two live thumbs-up rates (canary minus serving), over the rated
    answers of each since the canary started."""

    n_candidate: int
    n_incumbent: int
    candidate: float
    incumbent: float
    gain: float
    stderr: float
    lower_bound: float
    min_gain: float
    confidence: float
    passed: bool

    def describe(self) -> str:
        return (f"live thumbs-up rate, two-proportion z test: canary {self.candidate:.3f} (n={self.n_candidate}) vs "
                f"serving {self.incumbent:.3f} (n={self.n_incumbent}), " + _gain_and_verdict(self))


def proportion_test(candidate_up: int, candidate_n: int, incumbent_up: int, incumbent_n: int, *,
                    min_gain: float = 0.0, confidence: float = 0.95) -> LiveTest:
    """Unpooled (Wald) standard error of p_c - p_i: the two arms are rated by different users on different
    prompts, so the test is unpaired; a rate of 0 or 1 in both arms gives SE 0 and passes only on a real gain."""
    if min(candidate_n, incumbent_n) < 1:
        raise KtoLoopError(f"a live test needs rated answers of both models (canary {candidate_n}, serving "
                           f"{incumbent_n})")
    p_c, p_i = candidate_up / candidate_n, incumbent_up / incumbent_n
    stderr = math.sqrt(p_c * (1 - p_c) / candidate_n + p_i * (1 - p_i) / incumbent_n)
    bound = (p_c - p_i) - float(stats.norm.ppf(confidence)) * stderr
    return LiveTest(candidate_n, incumbent_n, p_c, p_i, p_c - p_i, stderr, bound, min_gain, confidence,
                    passed=bound > min_gain)


@dataclass(frozen=True)
class Gate:
    passed: bool
    summary: str
    capability: dict[str, Any]
    preference: dict[str, Any]
    incumbent_id: str | None = None
    """The model serving when the verdict was reached (None: the bare reference); a verdict is about it only."""
    canary: dict[str, Any] | None = None
    """While a canary: its model_version and when it started (``flows.loop.start_canary``)."""
    live: dict[str, Any] | None = None
    """The canary's live verdict (``LiveTest``), which then decides ``passed``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def verdict(preference: PreferenceTest, capability, incumbent_id: str | None, versus: str,
            guard_stop: dict | None = None) -> Gate:
    """Promote only when the preference gain is significant, no capability regresses, and no guard stopped
    the run (PPO's KL bound or reward-hacking check)."""
    cap = (f"capability {'ok' if capability.passed else 'REGRESSION'}: "
           + "; ".join(c.describe() for c in capability.failures or capability.checks[:3]))
    pref = f"vs {versus}: {preference.describe()}"
    guard = f" | stopped by a guard: {guard_stop.get('reason', guard_stop)}" if guard_stop else ""
    passed = capability.passed and preference.passed and not guard_stop
    head = "PROMOTE" if passed else "REJECT"
    return Gate(passed=passed, summary=f"{head} | {pref} | {cap}{guard}",
                capability={"passed": capability.passed, "checks": [dataclasses.asdict(c) for c in capability.checks],
                            "problems": capability.problems},
                preference={**dataclasses.asdict(preference), "guard_stop": guard_stop},
                incumbent_id=incumbent_id)
