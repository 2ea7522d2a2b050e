"""Convert Anthropic HH-RLHF pairs into feedback events: the chosen answer is a thumbs up, the rejected one
a thumbs down, both for the same prompt (the transcript up to the final ``Assistant:`` turn)."""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ktoloop.errors import KtoLoopError

ASSISTANT = "\n\nAssistant:"


def split_transcript(text: str) -> tuple[str, str]:
    """(prompt, response): everything up to and including the final ``Assistant:`` marker, and the reply."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no final 'Assistant:' turn")
    return text[: cut + len(ASSISTANT)].strip(), text[cut + len(ASSISTANT):].strip()


def convert(path: str | Path, model_version: str, start: dt.datetime | None = None,
            source: str = "hh-rlhf") -> Iterator[dict[str, Any]]:
    """Yield two events per usable pair, with deterministic ids (``hh-<line>-up`` / ``hh-<line>-down``).

    Pairs whose prompts differ or whose responses are empty are skipped: they are not same-prompt feedback.
    """
    path = Path(path)
    if not path.is_file():
        raise KtoLoopError(f"HH-RLHF file not found: {path}")
    start = start or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            try:
                pair = json.loads(line)
                prompt, chosen = split_transcript(pair["chosen"])
                rejected_prompt, rejected = split_transcript(pair["rejected"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
            if prompt != rejected_prompt or not chosen or not rejected or chosen == rejected:
                continue
            prompt_id = "hh-" + hashlib.sha256(prompt.encode()).hexdigest()[:16]
            when = (start + dt.timedelta(seconds=60 * line_no)).isoformat()
            for label, response in (("up", chosen), ("down", rejected)):
                yield {
                    "event_id": f"hh-{line_no}-{label}", "prompt": prompt, "response": response, "label": label,
                    "model_version": model_version, "event_time": when, "prompt_id": prompt_id,
                    "conversation_id": f"hh-{line_no}", "source": source,
                }
