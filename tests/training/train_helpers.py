"""Hand-made snapshots for training tests, written in the format ktoloop/snapshot.py reads."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import polars as pl

from ktoloop.decision import Decision
from ktoloop.methods import METHODS
from ktoloop.snapshot import (KTO_COLUMNS, KTO_FILE, MANIFEST, PAIR_COLUMNS, PAIRS_FILE, Manifest, load_snapshot,
                              write_files)

TOPICS = ["the sky", "rivers", "bread", "chess", "the moon", "tea", "bicycles", "music", "rain", "glass",
          "owls", "maps", "salt", "clocks", "snow", "paper", "bees", "trains", "stars", "soap",
          "ice", "wolves", "ink", "kites"]


def write_snapshot(root: Path, snapshot_id: str = "snap-test", *, kto_train: list[dict] | None = None,
                   kto_eval: list[dict] | None = None, pairs_train: list[dict] | None = None,
                   pairs_eval: list[dict] | None = None, model_version: str = "tiny-v1",
                   kto_weights: dict | None = None):
    """Write the Parquet files + manifest.json under ``root/snapshot_id`` and load it back."""
    path = root / snapshot_id

    def frame(rows: list[dict] | None, schema: dict) -> pl.DataFrame:
        rows = [{**r, "prompt_key": r.get("prompt_key", hashlib.md5(r["prompt"].encode()).hexdigest())}
                for r in rows or []]
        return pl.DataFrame(rows, schema=schema)

    kto = {"train": frame(kto_train, KTO_COLUMNS), "eval": frame(kto_eval, KTO_COLUMNS)}
    pairs = {"train": frame(pairs_train, PAIR_COLUMNS), "eval": frame(pairs_eval, PAIR_COLUMNS)}
    write_files(path, kto, pairs)
    digest = hashlib.sha256((path / KTO_FILE).read_bytes() + (path / PAIRS_FILE).read_bytes())
    manifest = Manifest(snapshot_id=snapshot_id, content_sha256=digest.hexdigest(), model_version=model_version,
                        kto_weights=kto_weights or {"desirable": 1.0, "undesirable": 1.0},
                        counts=_counts(kto["train"], pairs["train"]))
    (path / MANIFEST).write_text(manifest.to_json())
    return load_snapshot(path)


def _counts(kto: pl.DataFrame, pairs: pl.DataFrame) -> dict[str, int]:
    """The counts the rules read (``ktoloop.methods.DataStats.of``), as the builder records them."""
    up = int(kto["label"].sum())
    return {"kto_train_desirable": up, "kto_train_undesirable": kto.height - up, "pairs_train": pairs.height,
            "conflicts": 0, "answers": kto.height}


def allow(snapshot, method: str = "kto", **changes) -> Decision:
    """A decision about ``snapshot`` that trains ``method`` and finds every method eligible (hand-made
    snapshots are far below the real rules' 500 examples); ``changes`` replace its fields."""
    decision = Decision(method=method, train=True, reasons=[f"{method}: hand-made snapshot"], warnings=[],
                        eligibility={m: {"eligible": True, "reason": "eligible"} for m in METHODS}, counts={},
                        noise_rate=0.0, thresholds={}, snapshot_id=snapshot.manifest.snapshot_id, key="test")
    return dataclasses.replace(decision, **changes)


def good(topic: str) -> str:
    return f"Sure! Here is a short, friendly note about {topic}. I hope it helps."


def bad(topic: str) -> str:
    return f"no. {topic} is boring, ask someone else"


def kto_rows(topics: list[str]) -> list[dict]:
    rows = []
    for t in topics:
        rows.append({"prompt": f"Tell me about {t}.", "completion": good(t), "label": True})
        rows.append({"prompt": f"Tell me about {t}.", "completion": bad(t), "label": False})
    return rows


def pair_rows(topics: list[str]) -> list[dict]:
    return [{"prompt": f"Tell me about {t}.", "chosen": good(t), "rejected": bad(t)} for t in topics]


def toy_snapshot(root: Path, snapshot_id: str = "toy", model_version: str = "tiny-v1", **kw):
    """16 train topics, 8 held-out topics, both formats."""
    train, held = TOPICS[:16], TOPICS[16:]
    return write_snapshot(root, snapshot_id, kto_train=kto_rows(train), kto_eval=kto_rows(held),
                          pairs_train=pair_rows(train), pairs_eval=pair_rows(held), model_version=model_version, **kw)


SMALL_GATES = """[dataset.gates]
min_examples = 8
warn_examples = 16
min_pairs = 4
ppo_enabled = true
ppo_budget_tokens = 4096
"""
"""Rules that hand-made snapshots pass (the real ones refuse under 500 examples): write it as ./ktoloop.toml."""
