"""The drift trigger's cooldown: after ``kto.drift.detected`` is emitted, further ones are held for
``[flows] drift_cooldown_s``, so drift that persists on unchanged data starts one retrain, not one an hour.

The last emission is recorded in ``<home>/monitoring/drift-trigger.json`` (time, reasons, windows).
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from ktoloop.errors import KtoLoopError

UTC = dt.timezone.utc


def state_file(home: Path) -> Path:
    return home / "monitoring" / "drift-trigger.json"


def last_emission(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise KtoLoopError(f"drift trigger state {path} is unreadable ({exc}); delete it to reset the "
                           "cooldown") from None


def held_until(path: Path, cooldown_s: int, now: dt.datetime) -> dt.datetime | None:
    """When the cooldown after the last emission ends, if it has not yet; None: an event may be emitted."""
    last = last_emission(path)
    if last is None or cooldown_s <= 0:
        return None
    until = dt.datetime.fromisoformat(last["emitted_at"]) + dt.timedelta(seconds=cooldown_s)
    return until if now < until else None


def record_emission(path: Path, now: dt.datetime, finding: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"emitted_at": now.isoformat(), "reasons": finding.get("reasons"),
                               "reference": finding.get("reference"), "current": finding.get("current")}))
    os.replace(tmp, path)  # a crash mid-write never leaves half a record
