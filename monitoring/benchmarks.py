"""Benchmark files -> items, with the prompt formats lm-evaluation-harness uses. Formats: ktoloop/data/PROVENANCE.md.

Three item shapes cover every task: a choice among continuations (multiple choice, and WinoGrande's partial
scoring, where the context varies instead), one continuation (LAMBADA), and a document (perplexity).
"""

from __future__ import annotations

import bz2
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ktoloop.errors import KtoLoopError


@dataclass(frozen=True)
class ChoiceItem:
    """Option i is ``contexts[i] + continuations[i]``; ``chars[i]`` normalises its log-prob for acc_norm."""

    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    gold: int
    chars: tuple[int, ...]


@dataclass(frozen=True)
class ContinuationItem:
    context: str
    continuation: str


@dataclass(frozen=True)
class DocumentItem:
    text: str
    words: int
    bytes: int


def _require(path: Path) -> None:
    if not path.is_file():
        raise KtoLoopError(f"benchmark file {path} not found; set [monitoring] benchmarks_dir "
                           "(or the top-level data_dir, whose benchmarks/ it defaults to) to the folder holding it")


def _read_jsonl(path: Path) -> list[dict]:
    _require(path)
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise KtoLoopError(f"{path}:{line_no} is not valid JSON: {exc}") from exc
    return rows


def _field(row: dict, key: str, path: Path, index: int):
    if key not in row:
        raise KtoLoopError(f"{path} item {index} has no '{key}' field (keys: {sorted(row)})")
    return row[key]


def question_answer(path: Path) -> list[ChoiceItem]:
    """ARC, PIQA, BoolQ (``{query, choices, gold}``): ``<query>\\nAnswer: <choice>`` as in lm-eval."""
    items = []
    for i, row in enumerate(_read_jsonl(path)):
        context = str(_field(row, "query", path, i)).rstrip() + "\nAnswer:"
        choices = [str(c) for c in _field(row, "choices", path, i)]
        items.append(ChoiceItem((context,) * len(choices), tuple(" " + c for c in choices),
                                int(_field(row, "gold", path, i)), tuple(len(c) for c in choices)))
    return items


def winogrande(path: Path) -> list[ChoiceItem]:
    """Partial scoring: the same continuation after each option's context."""
    items = []
    for i, row in enumerate(_read_jsonl(path)):
        contexts = tuple(str(c) for c in _field(row, "context_options", path, i))
        continuation = " " + str(_field(row, "continuation", path, i)).strip()
        items.append(ChoiceItem(contexts, (continuation,) * len(contexts), int(_field(row, "gold", path, i)),
                                (len(continuation),) * len(contexts)))
    return items


def _hellaswag_clean(text: str) -> str:
    # lm-eval's preprocess: WikiHow artefacts out, double spaces collapsed
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag(path: Path) -> list[ChoiceItem]:
    """Six lines per item: ``label: context``, the gold index, four endings."""
    _require(path)
    lines = bz2.open(path, "rt", encoding="utf-8").read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise KtoLoopError(f"{path} has {len(lines)} lines, not a multiple of 6 (label: context, gold, 4 endings)")
    items = []
    for start in range(0, len(lines), 6):
        context = _hellaswag_clean(lines[start])
        endings = [_hellaswag_clean(e) for e in lines[start + 2:start + 6]]
        try:
            gold = int(lines[start + 1])
        except ValueError:
            raise KtoLoopError(f"{path}:{start + 2}: gold index {lines[start + 1]!r} is not an integer") from None
        items.append(ChoiceItem((context,) * 4, tuple(" " + e for e in endings), gold, tuple(len(e) for e in endings)))
    return items


def lambada(path: Path) -> list[ContinuationItem]:
    """The last word, predicted after the passage."""
    return [ContinuationItem(str(_field(r, "context", path, i)).rstrip(),
                             " " + str(_field(r, "continuation", path, i)).strip())
            for i, r in enumerate(_read_jsonl(path))]


_HEADING = re.compile(r"^ = [^=].* = $")


def _detokenize(text: str) -> str:
    # undo WikiText's spaced punctuation, as lm-eval's wikitext_detokenizer does (<unk> stays: it is lost)
    for old, new in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                     (" : ", ": "), (" 's", "'s"), (" n't", "n't"), ("( ", "("), (" )", ")"), ("= = =", "==="),
                     ("= =", "=="), (" \n", "\n"), ("\n ", "\n")):
        text = text.replace(old, new)
    return text


def wikitext(path: Path) -> list[DocumentItem]:
    """One item per article (a ``= Title =`` line starts one); words are counted on the original text."""
    _require(path)
    docs: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if _HEADING.match(line) or not docs:
            docs.append([])
        docs[-1].append(line)
    items = []
    for lines in docs:
        original = "\n".join(lines).strip()
        if original:
            text = _detokenize(original)
            items.append(DocumentItem(text, len(original.split()), len(text.encode("utf-8"))))
    return items
