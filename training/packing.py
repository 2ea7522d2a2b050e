"""Several continuations of one context in one row, so the context is computed once, not once per continuation.

A row is the context, then each continuation in turn. A continuation's tokens attend to the context and to
their own earlier tokens only (a block mask instead of the causal one) and are numbered (position ids) as if
they followed the context alone, so each continuation's log-probs are what scoring it on its own gives, up to
float rounding. Where it pays: a held-out pair's chosen and rejected answers share their prompt (a third
fewer tokens on the demo's pairs), and a multiple-choice item's options share the question (ARC-Easy's
requests: two thirds fewer). Sequences whose context appears once cost what they did unpacked.

Scoring only (no grad): training steps keep plain right-padded batches (``training.data.collate``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

Tokens = Sequence[int]


@dataclass(frozen=True)
class Row:
    context: tuple[int, ...]
    continuations: tuple[tuple[int, tuple[int, ...]], ...]
    """(index of the sequence in the caller's list, its continuation tokens), in row order."""

    @property
    def length(self) -> int:
        """Tokens the row feeds the model: the last one predicts nothing and is left out."""
        return len(self.context) + sum(len(tokens) for _, tokens in self.continuations) - 1


def plan_rows(sequences: Sequence[tuple[Tokens, Tokens]], max_tokens: int) -> list[Row]:
    """Rows for ``(context, continuation)`` sequences: those with the same context share a row while it stays
    within ``max_tokens`` (a sequence longer than that gets a row of its own). Contexts must be non-empty."""
    open_rows: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    rows: list[Row] = []
    for index, (context, continuation) in enumerate(sequences):
        context, continuation = tuple(context), tuple(continuation)
        if not context:
            raise ValueError(f"sequence {index} has an empty context; condition it on a BOS/EOS token")
        members = open_rows.setdefault(context, [])
        grown = len(context) + sum(len(t) for _, t in members) + len(continuation) - 1
        if members and grown > max_tokens:
            rows.append(Row(context, tuple(members)))
            members = open_rows[context] = []
        members.append((index, continuation))
    rows += [Row(context, tuple(members)) for context, members in open_rows.items() if members]
    return rows


@dataclass(frozen=True)
class PackedBatch:
    """Rows padded to one width, and where each sequence's scored tokens are."""

    input_ids: torch.Tensor       # (B, L)
    attention_mask: torch.Tensor  # (B, 1, L, L) bool: may position i attend to position j
    position_ids: torch.Tensor    # (B, L)
    sequences: list[int]
    """The caller's index of each sequence in the batch; ``owners`` index into this list."""
    scored: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    """(row, column, target, owner) per scored token: the position whose output predicts ``target``."""

    @property
    def size(self) -> int:
        return len(self.sequences)


def collate_rows(rows: Sequence[Row], pad_id: int, device: torch.device | str = "cpu") -> PackedBatch:
    width = max(max(row.length for row in rows), 1)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).repeat(len(rows), 1, 1, 1)  # padding sees itself: no empty softmax
    sequences: list[int] = []
    scored: list[list[int]] = [[], [], [], []]
    for r, row in enumerate(rows):
        tokens = list(row.context) + [t for _, cont in row.continuations for t in cont]
        ids[r, : row.length] = torch.tensor(tokens[: row.length])
        n = len(row.context)
        positions[r, :n] = torch.arange(n)
        mask[r, 0, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        start = n
        for index, cont in row.continuations:
            k = len(cont)
            end = min(start + k, row.length)  # the row's very last token is not fed
            positions[r, start:end] = torch.arange(n, n + end - start)
            mask[r, 0, start:end, :n] = True
            mask[r, 0, start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
            owner = len(sequences)
            sequences.append(index)
            predictors = [n - 1] + list(range(start, start + k - 1))  # token j of cont is predicted at the one before
            for column, target in zip(predictors, cont):
                scored[0].append(r), scored[1].append(column), scored[2].append(target), scored[3].append(owner)
            start += k
    index_tensors = tuple(torch.tensor(values, dtype=torch.long, device=device) for values in scored)
    return PackedBatch(ids.to(device), mask.to(device), positions.to(device), sequences, index_tensors)


def batches(rows: Sequence[Row], *, max_sequences: int | None = None,
            max_tokens: int | None = None) -> list[list[Row]]:
    """Rows sorted longest first and cut into batches of at most ``max_sequences`` sequences or ``max_tokens``
    padded tokens (rows x the longest), whichever binds; a batch always takes at least one row."""
    ordered = sorted(rows, key=lambda row: -row.length)
    out: list[list[Row]] = []
    current: list[Row] = []
    for row in ordered:
        sequences = sum(len(r.continuations) for r in current) + len(row.continuations)
        too_many = max_sequences is not None and sequences > max_sequences
        longest = current[0].length if current else row.length
        too_wide = max_tokens is not None and longest * (len(current) + 1) > max_tokens
        if current and (too_many or too_wide):
            out.append(current)
            current = []
        current.append(row)
    if current:
        out.append(current)
    return out
