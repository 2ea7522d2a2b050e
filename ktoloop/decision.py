"""Which alignment method the data allow: the sufficiency gate, each method's rule, and a decision that
explains itself.

Under ``min_examples`` usable examples there is no training; under ``warn_examples`` a warning. Then the
first method of the configured preference order whose rule (``ktoloop.methods.METHODS``) passes, or the
forced method if its rule passes.

A decision is a pure function of a snapshot's counts and the rules' settings (gates, forced method, whether
a reward model exists), so it is not part of the snapshot: a snapshot is immutable data, and the same data
under stricter gates is the same snapshot with another decision. Each decision carries its snapshot id and
``key`` (a hash of those settings); the loop records it in DuckDB's ``decisions`` table under
(snapshot_id, key), and every trainer checks the one it is given (``training.runtime.check_decision``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any

from ktoloop.errors import KtoLoopError
from ktoloop.methods import METHODS, DataStats, GateConfig


class IneligibleMethod(KtoLoopError):
    """A forced method the data do not allow; the message says why."""


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
    snapshot_id: str = ""
    """The snapshot decided about ("" for a decision made from bare counts)."""
    key: str = ""
    """``decision_key`` of the settings it was made under."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Decision":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def decision_key(gates: GateConfig, forced: str | None, reward_model: bool) -> str:
    """16 hex of sha256 over everything a decision depends on besides the data."""
    settings = json.dumps({"gates": asdict(gates), "forced": forced, "reward_model": reward_model},
                          sort_keys=True, default=str)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


def decide_snapshot(snapshot_id: str, counts: dict[str, Any], gates: GateConfig, forced: str | None = None,
                    reward_model: bool = False) -> Decision:
    """The decision about a snapshot from its recorded counts (``Manifest.counts``), stamped with its id."""
    decision = decide(DataStats.of(counts, reward_model), gates, forced)
    return Decision.from_dict({**decision.to_dict(), "snapshot_id": snapshot_id,
                               "key": decision_key(gates, forced, reward_model)})


def decide(stats: DataStats, gates: GateConfig, forced: str | None = None) -> Decision:
    """Apply the sufficiency gate and the method rules; raise IneligibleMethod for a bad forced method."""
    if forced is not None and forced not in METHODS:
        raise IneligibleMethod(f"unknown method {forced!r}; choose from {list(METHODS)}")
    eligibility = {name: {"eligible": (why := m.rule(stats, gates)) is None, "reason": why or "eligible"}
                   for name, m in METHODS.items()}
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
