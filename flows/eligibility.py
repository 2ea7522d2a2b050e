"""Which alignment method the data allow: a table of rules, and a decision that explains itself.

Rules from alignment practice, enforced here rather than documented:
  * under ``min_examples`` usable examples there is no training; under ``warn_examples`` a warning;
  * KTO is the default for unpaired binary feedback;
  * DPO needs enough same-prompt pairs and little label noise; IPO (robust to noise) when noise is high;
  * PPO only when explicitly enabled with a compute budget and a reward model for this reference exists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from ktoloop.config import ConfigError
from ktoloop.errors import KtoLoopError

METHODS = ("kto", "dpo", "ipo", "ppo")


class IneligibleMethod(KtoLoopError):
    """A forced method the data do not allow; the message says why."""


@dataclass(frozen=True)
class GateConfig:
    min_examples: int = 500
    """Refuse to train under this many usable training examples."""
    warn_examples: int = 5000
    """Train, with a warning, under this many."""
    min_pairs: int = 1000
    """Same-prompt pairs needed before DPO or IPO is eligible."""
    max_noise_rate: float = 0.05
    """Conflict (label-noise) rate at or above which pairs go to IPO instead of DPO."""
    ppo_enabled: bool = False
    ppo_budget_tokens: int = 0
    """PPO's compute budget in generated tokens; PPO is ineligible without one."""
    preference: list[str] = field(default_factory=lambda: ["kto"])
    """Automatic choice: the first eligible method in this order (KTO by default)."""

    def __post_init__(self) -> None:
        if not 0 < self.min_examples <= self.warn_examples:
            raise ConfigError("dataset.gates: need 0 < min_examples <= warn_examples")
        if not 0 <= self.max_noise_rate <= 1:
            raise ConfigError(f"dataset.gates.max_noise_rate must be in [0, 1], got {self.max_noise_rate}")
        unknown = [m for m in self.preference if m not in METHODS]
        if unknown or not self.preference:
            raise ConfigError(f"dataset.gates.preference: unknown or empty {unknown}; choose from {METHODS}")


@dataclass(frozen=True)
class DataStats:
    """What the rules look at: counts of the training split after cleaning."""

    desirable: int
    undesirable: int
    pairs: int
    conflicts: int
    units: int
    """Distinct (prompt, response) answers before conflicts were removed: the noise rate's denominator."""
    reward_model: bool = False

    @property
    def usable(self) -> int:
        return self.desirable + self.undesirable

    @property
    def noise_rate(self) -> float:
        return self.conflicts / self.units if self.units else 0.0


@dataclass(frozen=True)
class Decision:
    method: str | None
    train: bool
    reasons: list[str]
    warnings: list[str]
    eligibility: dict[str, dict[str, Any]]
    counts: dict[str, int]
    noise_rate: float
    thresholds: dict[str, Any]
    forced: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Each rule returns None when the method is eligible, else the reason it is not.
Rule = Callable[[DataStats, GateConfig], "str | None"]


def _kto(s: DataStats, g: GateConfig) -> str | None:
    if s.desirable == 0 or s.undesirable == 0:
        return f"KTO needs both thumbs up and down (have {s.desirable} up, {s.undesirable} down)"
    return None


def _dpo(s: DataStats, g: GateConfig) -> str | None:
    if s.pairs < g.min_pairs:
        return f"only {s.pairs} same-prompt pairs (< min_pairs {g.min_pairs})"
    if s.noise_rate >= g.max_noise_rate:
        return f"label noise {s.noise_rate:.1%} >= {g.max_noise_rate:.1%}: use IPO, which tolerates noise"
    return None


def _ipo(s: DataStats, g: GateConfig) -> str | None:
    if s.pairs < g.min_pairs:
        return f"only {s.pairs} same-prompt pairs (< min_pairs {g.min_pairs})"
    if s.noise_rate < g.max_noise_rate:
        return f"label noise {s.noise_rate:.1%} < {g.max_noise_rate:.1%}: pairs are clean, DPO applies"
    return None


def _ppo(s: DataStats, g: GateConfig) -> str | None:
    if not g.ppo_enabled:
        return "PPO is not enabled (dataset.gates.ppo_enabled)"
    if g.ppo_budget_tokens <= 0:
        return "PPO needs a compute budget (dataset.gates.ppo_budget_tokens)"
    if not s.reward_model:
        return "no reward model trained for this reference (`ktoloop reward train`)"
    return None


RULES: dict[str, Rule] = {"kto": _kto, "dpo": _dpo, "ipo": _ipo, "ppo": _ppo}


def decide(stats: DataStats, gates: GateConfig, forced: str | None = None) -> Decision:
    """Apply the sufficiency gate and the method rules; raise IneligibleMethod for a bad forced method."""
    if forced is not None and forced not in RULES:
        raise IneligibleMethod(f"unknown method {forced!r}; choose from {list(RULES)}")
    eligibility = {m: {"eligible": (why := rule(stats, gates)) is None, "reason": why or "eligible"}
                   for m, rule in RULES.items()}
    counts = {"usable": stats.usable, "desirable": stats.desirable, "undesirable": stats.undesirable,
              "pairs": stats.pairs, "conflicts": stats.conflicts}
    reasons: list[str] = []
    warnings: list[str] = []
    record = dict(eligibility=eligibility, counts=counts, noise_rate=stats.noise_rate,
                  thresholds=asdict(gates), forced=forced)

    if stats.usable < gates.min_examples:
        reasons.append(f"not enough data: {stats.usable} usable training examples ({stats.desirable} up, "
                       f"{stats.undesirable} down) < {gates.min_examples}; no training")
        return Decision(method=None, train=False, reasons=reasons, warnings=warnings, **record)
    if stats.usable < gates.warn_examples:
        warnings.append(f"only {stats.usable} usable examples (< {gates.warn_examples}): expect a noisy result")

    if forced is not None:
        if not eligibility[forced]["eligible"]:
            raise IneligibleMethod(f"method {forced!r} is not eligible: {eligibility[forced]['reason']}")
        reasons.append(f"{forced} forced by the caller; eligible")
        return Decision(method=forced, train=True, reasons=reasons, warnings=warnings, **record)

    for method in gates.preference:
        if eligibility[method]["eligible"]:
            reasons.append(f"{method}: first eligible method in preference order {gates.preference}")
            others = [m for m in METHODS if m != method and eligibility[m]["eligible"]]
            if others:
                reasons.append(f"also eligible: {others} (force with --method)")
            return Decision(method=method, train=True, reasons=reasons, warnings=warnings, **record)
    reasons.append("no method in the preference order is eligible: " +
                   "; ".join(f"{m}: {eligibility[m]['reason']}" for m in gates.preference))
    return Decision(method=None, train=False, reasons=reasons, warnings=warnings, **record)
