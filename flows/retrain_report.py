"""A retrain's outcome as Markdown: decision, gate verdict with its numbers, and lineage (the Prefect
artifact ``retrain-gate`` each retrain run publishes, so the UI shows why a model was or was not promoted)."""

from __future__ import annotations

from typing import Any

ARTIFACT_KEY = "retrain-gate"


def _num(value: Any, fmt: str = "{:+.4f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def retrain_markdown(outcome: dict[str, Any], lineage: dict[str, Any] | None = None) -> str:
    """``outcome`` is a ``RetrainOutcome`` as a dict; ``lineage`` the candidate's registry fields, if any."""
    d = outcome.get("decision") or {}
    head = outcome["status"].upper() + (" (already decided)" if outcome.get("already_decided") else "")
    gate = outcome.get("gate")
    reason = [] if gate and outcome["reason"] == gate["summary"] else [outcome["reason"], ""]  # else shown below
    lines = [f"## Retrain ({outcome['trigger']}): {head}", "", *reason,
             f"**Snapshot** `{outcome.get('snapshot_id')}`; **decision**: "
             + (f"train with {str(d.get('method')).upper()}" if d.get("train") else "no training")]
    lines += [f"- {r}" for r in d.get("reasons", [])] + [f"- warning: {w}" for w in d.get("warnings", [])]
    if outcome.get("canary"):
        lines += ["", f"### The pending canary, decided first: {outcome['canary']['status'].upper()}", "",
                  f"`{outcome['canary']['reason']}`"]
    if gate and gate.get("canary") and outcome["status"] == "canary":
        lines += ["", f"Passed the gate: starts as a canary; production stamps `{gate['canary']['model_version']}` "
                      "on the feedback of the share of traffic it serves."]
    if gate:
        p = gate["preference"]
        lines += ["", f"### Preference vs {gate.get('incumbent_id') or 'the reference'} (paired one-sided t test)", ""]
        lines += _table(["form", "n", "candidate", "incumbent", "gain", "stderr", f"{p['confidence']:.0%} lower bound",
                         "min gain", "verdict"],
                        [[p["form"], p["n"], _num(p["candidate"], "{:.3f}"), _num(p["incumbent"], "{:.3f}"),
                          _num(p["gain"], "{:+.3f}"), _num(p["stderr"], "{:.3f}"), _num(p["lower_bound"], "{:+.3f}"),
                          _num(p["min_gain"], "{:+.3f}"), "pass" if p["passed"] else "FAIL"]])
        if p.get("guard_stop"):
            lines += ["", f"Stopped by a guard: {p['guard_stop']}"]
        c = gate["capability"]
        lines += ["", f"### Capability vs the reference (non-inferiority): {'ok' if c['passed'] else 'REGRESSION'}", ""]
        lines += _table(["benchmark", "metric", "n", "reference", "candidate", "drop", "upper bound", "tolerance",
                         "verdict"],
                        [[k["benchmark"], k["metric"], k["n"], _num(k["reference"], "{:.4f}"),
                          _num(k["candidate"], "{:.4f}"), _num(k["drop"]), _num(k["upper_bound"], "{:+.4f}"),
                          _num(k["tolerance"], "{:.4f}"), "ok" if k["passed"] else "REGRESSION"] for k in c["checks"]])
        lines += [f"- problem: {x}" for x in c.get("problems", [])]
        lines += ["", f"Gate: `{gate['summary']}`"]
    if lineage:
        lines += ["", "### Lineage", ""]
        lines += _table(["field", "value"], [[k, f"`{v}`"] for k, v in lineage.items()])
    return "\n".join(lines) + "\n"
