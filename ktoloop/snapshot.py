"""The dataset snapshot contract between the dataset builder (writer) and the trainers (readers).

A snapshot is a directory ``<home>/snapshots/<snapshot_id>/`` holding two Parquet files and ``manifest.json``.
Training reads only snapshots, never the live ``feedback`` table, so a run is reproducible from its id.

  kto.parquet    the binary set, one row per answer: prompt: str, completion: str, label: bool (True =
                 desirable), prompt_key: str, truncated: bool (cut off at the serving token limit: trained
                 without an end-of-turn token), answer_id: uint64 (unique within a prompt),
                 split: "train"|"eval"
  pairs.parquet  same-prompt pairs: prompt_key, chosen_id, rejected_id (answer_ids of two kto rows), split

Each answer's text is stored once: a pair names its two answers instead of repeating their text (both are
rows of kto.parquet in the same split), and the split is a column, so the builder writes all of it in one
pass over the feedback table. ``Snapshot.kto(split)`` and ``Snapshot.pairs(split)`` resolve this into the
frames the trainers use: (prompt, completion, label, prompt_key, truncated) and (prompt, chosen, rejected,
prompt_key, chosen_truncated, rejected_truncated), in a canonical order (by prompt key and answer ids)
whatever order the files were written in: the builder's parallel COPY does not fix row order, and the
training batches are drawn by row index, so the same content must give the same rows.
``write_files`` writes the format from frames, for snapshots made outside the builder (tests, imports).
A ``truncated`` column absent from those frames, or from the files of a snapshot older than it, reads as False.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ktoloop.errors import KtoLoopError

SPLITS = ("train", "eval")
KTO_COLUMNS = {"prompt": pl.String, "completion": pl.String, "label": pl.Boolean, "prompt_key": pl.String,
               "truncated": pl.Boolean}
PAIR_COLUMNS = {"prompt": pl.String, "chosen": pl.String, "rejected": pl.String, "prompt_key": pl.String}
RESOLVED_PAIR_COLUMNS = {**PAIR_COLUMNS, "chosen_truncated": pl.Boolean, "rejected_truncated": pl.Boolean}
DEFAULTS = {"truncated": False}
"""Columns that may be absent or null (frames written by hand, files from before the column): their value then."""
KTO_FILE, PAIRS_FILE, MANIFEST = "kto.parquet", "pairs.parquet", "manifest.json"
KTO_STORED = {**KTO_COLUMNS, "answer_id": pl.UInt64, "split": pl.String}
PAIRS_STORED = {"prompt_key": pl.String, "chosen_id": pl.UInt64, "rejected_id": pl.UInt64, "split": pl.String}


@dataclass(frozen=True)
class Manifest:
    snapshot_id: str
    content_sha256: str
    """sha256 over the Parquet files' logical content: same data -> same hash."""
    model_version: str
    """The reference model version that produced every response in the snapshot."""
    kto_weights: dict[str, float]
    """{"desirable": lambda_D, "undesirable": lambda_U}"""
    counts: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    query: str = ""
    watermark: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: Manifest

    def kto(self, split: str) -> pl.DataFrame:
        return self._answers(split).select([pl.col(c).cast(t) for c, t in KTO_COLUMNS.items()])

    def pairs(self, split: str) -> pl.DataFrame:
        answers = self._answers(split).select("prompt_key", "answer_id", "prompt", "completion", "truncated")
        pairs = (_scan(self.path / PAIRS_FILE, PAIRS_STORED).filter(pl.col("split") == split)
                 .sort("prompt_key", "chosen_id", "rejected_id").collect())
        resolved = (pairs
                    .join(answers.rename({"answer_id": "chosen_id", "completion": "chosen",
                                          "truncated": "chosen_truncated"}),
                          on=["prompt_key", "chosen_id"], how="left", maintain_order="left")
                    .join(answers.drop("prompt").rename({"answer_id": "rejected_id", "completion": "rejected",
                                                         "truncated": "rejected_truncated"}),
                          on=["prompt_key", "rejected_id"], how="left", maintain_order="left"))
        dangling = resolved.filter(pl.col("chosen").is_null() | pl.col("rejected").is_null()).height
        if dangling:
            raise KtoLoopError(f"{self.path / PAIRS_FILE}: {dangling} {split} pair(s) name answers that are not "
                               f"{split} rows of {KTO_FILE}")
        return resolved.select([pl.col(c).cast(t) for c, t in RESOLVED_PAIR_COLUMNS.items()])

    def rows(self, kind: str, split: str) -> int:
        """Row count of ``kind`` ("kto" or "pairs") in ``split``; reads only the split column."""
        path, columns = (self.path / KTO_FILE, KTO_STORED) if kind == "kto" else (self.path / PAIRS_FILE, PAIRS_STORED)
        return _scan(path, columns).filter(pl.col("split") == split).select(pl.len()).collect().item()

    def _answers(self, split: str) -> pl.DataFrame:
        if split not in SPLITS:
            raise KtoLoopError(f"unknown split {split!r}; snapshots have {list(SPLITS)}")
        return (_scan(self.path / KTO_FILE, KTO_STORED).filter(pl.col("split") == split)
                .sort("prompt_key", "answer_id").collect())


def snapshots_dir(home: str | Path) -> Path:
    return Path(home) / "snapshots"


def load_snapshot(ref: str | Path, home: str | Path | None = None) -> Snapshot:
    """Load by directory path, or by id under ``<home>/snapshots``."""
    path = Path(ref)
    if not (path / MANIFEST).is_file() and home is not None:
        path = snapshots_dir(home) / str(ref)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise KtoLoopError(f"snapshot {ref!r} not found (no {manifest_path}); list them with `ktoloop dataset list`")
    try:
        data = json.loads(manifest_path.read_text())
        data.pop("decision", None)  # manifests before the decisions table carried one; it is not data
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise KtoLoopError(f"snapshot manifest {manifest_path} is invalid: {exc}") from exc
    if not (path / KTO_FILE).is_file() and (path / "kto_train.parquet").is_file():
        raise KtoLoopError(f"snapshot {path} is in the first format (kto_train.parquet, text in every pair file); "
                           f"rebuild it with `ktoloop dataset build`: the same data gets a new id")
    return Snapshot(path, manifest)


def write_files(path: str | Path, kto: dict[str, pl.DataFrame], pairs: dict[str, pl.DataFrame]) -> None:
    """Write kto.parquet and pairs.parquet from per-split frames with KTO_COLUMNS / PAIR_COLUMNS (``truncated``
    may be left out: False).

    Answer ids are a hash of the completion text. Refused: the same completion twice under one prompt and
    split (a duplicate or a conflict, which the builder removes), and a pair whose chosen or rejected text is
    not a kto row of its prompt and split (a pair is two labelled answers, never free-standing text).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    answers = _stack(kto, KTO_COLUMNS).with_columns(answer_id=pl.col("completion").hash(seed=0))
    repeated = answers.filter(pl.struct("prompt_key", "split", "answer_id").is_duplicated())
    if repeated.height:
        raise KtoLoopError(f"{repeated.height} kto rows repeat a completion under the same prompt and split, "
                           f"e.g. {repeated.row(0, named=True)['completion']!r}")
    pair_rows = _stack(pairs, PAIR_COLUMNS).with_columns(chosen_id=pl.col("chosen").hash(seed=0),
                                                         rejected_id=pl.col("rejected").hash(seed=0))
    for side in ("chosen", "rejected"):
        known = answers.select("prompt_key", "split", pl.col("answer_id").alias(f"{side}_id"))
        missing = pair_rows.join(known, on=["prompt_key", "split", f"{side}_id"], how="anti")
        if missing.height:
            raise KtoLoopError(f"{missing.height} pair(s) have a {side} answer that is not a kto row of the same "
                               f"prompt and split, e.g. {missing.row(0, named=True)[side]!r}")
    answers.select([pl.col(c).cast(t) for c, t in KTO_STORED.items()]).write_parquet(path / KTO_FILE)
    pair_rows.select([pl.col(c).cast(t) for c, t in PAIRS_STORED.items()]).write_parquet(path / PAIRS_FILE)


def _stack(frames: dict[str, pl.DataFrame], columns: dict[str, Any]) -> pl.DataFrame:
    unknown = set(frames) - set(SPLITS)
    if unknown:
        raise KtoLoopError(f"unknown split(s) {sorted(unknown)}; snapshots have {list(SPLITS)}")
    return pl.concat([_with_defaults(frames.get(split, pl.DataFrame(schema=columns)), columns).select(
        [pl.col(c).cast(t) for c, t in columns.items()]).with_columns(split=pl.lit(split)) for split in SPLITS])


def _with_defaults(frame, columns: dict[str, Any]):
    """``frame`` (eager or lazy) with each ``DEFAULTS`` column of ``columns`` that is absent or null filled with
    its default."""
    names = frame.collect_schema().names()
    return frame.with_columns([(pl.col(c).fill_null(v) if c in names else pl.lit(v, columns[c])).alias(c)
                               for c, v in DEFAULTS.items() if c in columns])


def _scan(path: Path, columns: dict[str, Any]) -> pl.LazyFrame:
    if not path.is_file():
        raise KtoLoopError(f"snapshot file missing: {path}")
    frame = _with_defaults(pl.scan_parquet(path), columns)
    missing = [c for c in columns if c not in frame.collect_schema().names()]
    if missing:
        raise KtoLoopError(f"{path} lacks column(s) {missing}")
    return frame.select([pl.col(c).cast(t) for c, t in columns.items()])
