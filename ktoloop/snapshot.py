"""The dataset snapshot contract between the dataset builder (writer) and the trainers (readers).

A snapshot is a directory ``<home>/snapshots/<snapshot_id>/`` holding Parquet files and ``manifest.json``.
Training reads only snapshots, never the live ``feedback`` table, so a run is reproducible from its id.

Files and columns:
  kto_train.parquet, kto_eval.parquet     prompt: str, completion: str, label: bool (True = desirable),
                                          prompt_key: str
  pairs_train.parquet, pairs_eval.parquet prompt: str, chosen: str, rejected: str, prompt_key: str
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ktoloop.errors import KtoLoopError

SPLITS = ("train", "eval")
KTO_COLUMNS = {"prompt": pl.String, "completion": pl.String, "label": pl.Boolean, "prompt_key": pl.String}
PAIR_COLUMNS = {"prompt": pl.String, "chosen": pl.String, "rejected": pl.String, "prompt_key": pl.String}
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    snapshot_id: str
    content_sha256: str
    """sha256 over the Parquet files' logical content: same data -> same hash."""
    model_version: str
    """The reference model version that produced every response in the snapshot."""
    kto_weights: dict[str, float]
    """{"desirable": lambda_D, "undesirable": lambda_U}"""
    decision: dict[str, Any]
    """The eligibility decision: {"method", "train", "reasons", "warnings", "counts", "thresholds", ...}."""
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
        return _read(self.path / f"kto_{split}.parquet", KTO_COLUMNS)

    def pairs(self, split: str) -> pl.DataFrame:
        return _read(self.path / f"pairs_{split}.parquet", PAIR_COLUMNS)


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
        manifest = Manifest(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise KtoLoopError(f"snapshot manifest {manifest_path} is invalid: {exc}") from exc
    return Snapshot(path, manifest)


def _read(path: Path, columns: dict[str, Any]) -> pl.DataFrame:
    if not path.is_file():
        raise KtoLoopError(f"snapshot file missing: {path}")
    frame = pl.read_parquet(path)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KtoLoopError(f"{path} lacks column(s) {missing}")
    return frame.select([pl.col(c).cast(t) for c, t in columns.items()])
