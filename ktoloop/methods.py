"""The one registry of alignment methods: what each trains on, when the data allow it, and its loss.

Everything that names a method reads it from ``METHODS``: the CLI's ``--method`` choices, the config checks,
the eligibility decision (``ktoloop.decision``), the offline losses (``training.losses``) and the loop's
choice of trainer. Adding a method is one entry here (plus its loss function or trainer).

Rules from alignment practice, enforced by the rules below rather than documented:
  * KTO is for unpaired binary feedback and needs both thumbs;
  * DPO needs enough same-prompt pairs and little label noise; IPO (robust to noise) when noise is high;
  * PPO only when explicitly enabled with a compute budget and a reward model for this reference exists.
The sufficiency gate (refuse under ``min_examples``, warn under ``warn_examples``) applies to every method.

This module imports no torch, so loading and validating a config stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ktoloop.config import ConfigError


@dataclass(frozen=True)
class GateConfig:
    """``[dataset.gates]``: the thresholds the rules read."""

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
            raise ConfigError(f"dataset.gates.preference: unknown or empty {unknown}; choose from {list(METHODS)}")


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

    @classmethod
    def of(cls, counts: dict[str, Any], reward_model: bool = False) -> "DataStats":
        """From a snapshot's counts (``flows.dataset._counts``); absent counts are 0."""
        n = {attr: int(counts.get(name) or 0) for attr, name in (
            ("desirable", "kto_train_desirable"), ("undesirable", "kto_train_undesirable"),
            ("pairs", "pairs_train"), ("conflicts", "conflicts"), ("units", "answers"))}
        return cls(**n, reward_model=reward_model)

    @property
    def usable(self) -> int:
        return self.desirable + self.undesirable

    @property
    def noise_rate(self) -> float:
        return self.conflicts / self.units if self.units else 0.0


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


@dataclass(frozen=True)
class Method:
    name: str
    trains_on: Literal["thumbs", "pairs", "samples"]
    """The snapshot's thumbs (completion, label), its same-prompt pairs, or fresh samples scored by a reward
    model (online)."""
    rule: Rule
    uses_kl: bool = False
    """Needs the mismatched-pair log-probs (KTO's z), one extra no-grad forward per step."""

    @property
    def paired(self) -> bool:
        return self.trains_on == "pairs"

    @property
    def online(self) -> bool:
        return self.trains_on == "samples"

    @property
    def loss(self):
        """The offline loss ``training.losses.<name>_loss`` (one shared signature); imported on use so that this
        registry needs no torch."""
        if self.online:
            raise AttributeError(f"{self.name} trains online (training.ppo), it has no offline loss")
        from training import losses

        return getattr(losses, f"{self.name}_loss")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("kto", "thumbs", _kto, uses_kl=True),
    Method("dpo", "pairs", _dpo),
    Method("ipo", "pairs", _ipo),
    Method("ppo", "samples", _ppo),
)}

OFFLINE = tuple(name for name, m in METHODS.items() if not m.online)
"""Methods trained by ``training.trainer.train`` on logged feedback: the ``[training] method`` choices."""
