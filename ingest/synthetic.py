"""Synthetic feedback traffic for benchmarks, tests and the demo's drifted window.

Realistic shapes (a few hundred bytes of prompt + response, a pool of repeated prompts so same-prompt pairs
occur, a chosen thumbs-up rate) from a seeded generator, so every run sees the same events.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Iterator
from typing import Any

_TOPICS = ["taxes", "a sourdough starter", "Python decorators", "jet lag", "a job interview", "houseplants",
           "the French revolution", "unit testing", "marathon training", "learning chess", "solar panels",
           "a cover letter", "SQL joins", "composting", "budget travel", "sleep hygiene"]
_ASKS = ["Explain {t} to a beginner.", "What are common mistakes with {t}?", "Give me three tips about {t}.",
         "How should I get started with {t}?", "Summarise the key ideas of {t} in a paragraph."]
_WORDS = ("the a to of and in that is for it with as on be this you are can your by or from not have more "
          "first step when should because most people usually start simple practice time example good "
          "important remember avoid check plan try keep list small make sure result").split()


def synthetic_events(n: int, *, seed: int = 0, up_rate: float = 0.7, model_version: str = "smollm2-135m-instruct-q4_1",
                     start: dt.datetime | None = None, prompts: int = 2000, source: str = "synthetic",
                     id_prefix: str = "syn") -> Iterator[dict[str, Any]]:
    """``n`` events over a pool of ``prompts`` prompts, thumbs up with probability ``up_rate``."""
    rng = random.Random(seed)
    start = start or dt.datetime(2026, 11, 1, tzinfo=dt.timezone.utc)
    pool = [f"{rng.choice(_ASKS).format(t=rng.choice(_TOPICS))} (context #{i}) " +
            " ".join(rng.choices(_WORDS, k=rng.randint(10, 40))) for i in range(prompts)]
    for i in range(n):
        p = rng.randrange(prompts)
        yield {
            "event_id": f"{id_prefix}-{seed}-{i}",
            "prompt": pool[p],
            "response": " ".join(rng.choices(_WORDS, k=rng.randint(30, 80))).capitalize() + ".",
            "label": "up" if rng.random() < up_rate else "down",
            "model_version": model_version,
            "event_time": (start + dt.timedelta(seconds=i)).isoformat(),
            "prompt_id": f"{id_prefix}-p{p}",
            "user_id": f"u{rng.randrange(10_000)}",
            "source": source,
        }
