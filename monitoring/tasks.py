"""The task registry: benchmark name -> file, loader, and how its items become requests and metrics.

A task's *kind* (choice, continuation, document) owns the maths: which requests an item needs, what each
item scores, and how item scores aggregate. Adding a benchmark is one ``Task`` line in ``TASKS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ktoloop.errors import KtoLoopError
from monitoring import benchmarks
from monitoring.scoring import Request, Score, encode_pair, prefix_token, rolling_requests

Aggregate = dict[str, tuple[float, float | None]]
"""metric -> (value, standard error or None)."""


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and its standard error (sample standard deviation / sqrt(n)), as lm-eval reports it."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class Kind(Protocol):
    def requests(self, item: Any, tokenizer: Any, max_length: int) -> list[Request]: ...

    def score(self, item: Any, scores: list[Score]) -> dict[str, float]: ...

    def aggregate(self, items: Sequence[Any], per_item: dict[str, list[float]]) -> Aggregate: ...


class ChoiceKind:
    """Pick the option with the highest log-prob (acc) or log-prob per character (acc_norm)."""

    def requests(self, item: benchmarks.ChoiceItem, tokenizer, max_length: int) -> list[Request]:
        return [encode_pair(tokenizer, c, x) for c, x in zip(item.contexts, item.continuations, strict=True)]

    def score(self, item: benchmarks.ChoiceItem, scores: list[Score]) -> dict[str, float]:
        logprobs = [s.logprob for s in scores]
        normed = [lp / max(chars, 1) for lp, chars in zip(logprobs, item.chars, strict=True)]
        return {"acc": float(_argmax(logprobs) == item.gold), "acc_norm": float(_argmax(normed) == item.gold)}

    def aggregate(self, items, per_item):
        return {metric: mean_stderr(values) for metric, values in per_item.items()}


class ContinuationKind:
    """LAMBADA: accuracy = greedy decoding reproduces the target; perplexity over the targets."""

    def requests(self, item: benchmarks.ContinuationItem, tokenizer, max_length: int) -> list[Request]:
        return [encode_pair(tokenizer, item.context, item.continuation)]

    def score(self, item, scores: list[Score]) -> dict[str, float]:
        return {"acc": float(scores[0].greedy), "logprob": scores[0].logprob}

    def aggregate(self, items, per_item):
        lp_mean, lp_se = mean_stderr(per_item["logprob"])
        ppl = math.exp(-lp_mean)
        return {"acc": mean_stderr(per_item["acc"]), "perplexity": (ppl, None if lp_se is None else ppl * lp_se)}


class DocumentKind:
    """Perplexity over whole documents in rolling windows; corpus-level word/byte perplexity and bits per byte."""

    def requests(self, item: benchmarks.DocumentItem, tokenizer, max_length: int) -> list[Request]:
        tokens = tokenizer(item.text, add_special_tokens=False)["input_ids"]
        return rolling_requests(tokens, prefix_token(tokenizer), max_length)

    def score(self, item: benchmarks.DocumentItem, scores: list[Score]) -> dict[str, float]:
        logprob = sum(s.logprob for s in scores)
        return {"logprob": logprob, "bits_per_byte": -logprob / item.bytes / math.log(2)}

    def aggregate(self, items, per_item):
        logprob = sum(per_item["logprob"])
        words = sum(i.words for i in items)
        size = sum(i.bytes for i in items)
        return {"word_perplexity": (math.exp(-logprob / words), None),
                "byte_perplexity": (math.exp(-logprob / size), None),
                "bits_per_byte": (-logprob / size / math.log(2), None)}


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


@dataclass(frozen=True)
class Task:
    name: str
    filename: str
    load: Callable[[Path], list[Any]]
    kind: Kind
    primary: str
    """The per-item metric the regression check compares."""
    higher_is_better: bool = True
    metrics: tuple[str, ...] = ()
    """Aggregated metrics to report; empty means all the kind produces."""

    def items(self, benchmarks_dir: str | Path) -> list[Any]:
        return self.load(Path(benchmarks_dir) / self.filename)


_CHOICE, _CONT, _DOC = ChoiceKind(), ContinuationKind(), DocumentKind()

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("arc_easy", "arc_easy.jsonl", benchmarks.question_answer, _CHOICE, "acc_norm"),
    Task("arc_challenge", "arc_challenge.jsonl", benchmarks.question_answer, _CHOICE, "acc_norm"),
    Task("hellaswag", "hellaswag_val_full.txt.bz2", benchmarks.hellaswag, _CHOICE, "acc_norm"),
    Task("piqa", "piqa.jsonl", benchmarks.question_answer, _CHOICE, "acc_norm"),
    Task("boolq", "boolq.jsonl", benchmarks.question_answer, _CHOICE, "acc", metrics=("acc",)),
    Task("winogrande", "winogrande.jsonl", benchmarks.winogrande, _CHOICE, "acc", metrics=("acc",)),
    Task("lambada", "lambada_openai.jsonl", benchmarks.lambada, _CONT, "acc"),
    Task("wikitext2", "wikitext2_test.txt", benchmarks.wikitext, _DOC, "bits_per_byte", higher_is_better=False),
]}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KtoLoopError(f"unknown benchmark {name!r}; known: {sorted(TASKS)}") from None
