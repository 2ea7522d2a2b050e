"""Aligned plain-text tables for the list commands: every value in full, so an id never wraps or loses its end."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any


def format_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *,
                 max_width: dict[str, int] | None = None) -> str:
    """Header and rows, columns separated by two spaces; numbers right-aligned, ``None`` as ``-``.

    ``max_width`` shortens named free-text columns (with ``...``), never the others."""
    limits = max_width or {}
    values = [list(row) for row in rows]
    numeric = [bool(values) and all(_is_number(row[i]) for row in values) for i in range(len(columns))]
    cells = [[_cell(v, limits.get(c)) for c, v in zip(columns, row, strict=True)] for row in values]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(list(columns))] + [line(row) for row in cells])


def print_frame(frame: Any, *, max_width: dict[str, int] | None = None, empty: str = "(none)") -> None:
    """Print a polars DataFrame with :func:`format_table`; ``empty`` when it has no rows."""
    print(format_table(frame.columns, frame.rows(), max_width=max_width) if frame.height else empty)


def _cell(value: Any, limit: int | None) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, dt.datetime):
        text = value.strftime("%Y-%m-%d %H:%M:%S")
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = " ".join(str(value).split())  # one line per row, whatever the text holds
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
