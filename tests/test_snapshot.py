"""The snapshot contract: texts stored once, pairs resolved from the answers they name, bad files refused."""

import polars as pl
import pytest

from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import (KTO_COLUMNS, KTO_FILE, MANIFEST, PAIR_COLUMNS, PAIRS_FILE, Manifest, Snapshot,
                              load_snapshot, write_files)


def kto(*rows):
    return pl.DataFrame([dict(zip(KTO_COLUMNS, r)) for r in rows], schema=KTO_COLUMNS)


def pairs(*rows):
    return pl.DataFrame([dict(zip(PAIR_COLUMNS, r)) for r in rows], schema=PAIR_COLUMNS)


def snapshot(path) -> Snapshot:
    return Snapshot(path, manifest=None)


def test_pairs_are_resolved_from_the_answers_they_name(tmp_path):
    write_files(tmp_path, {"train": kto(("p1", "yes", True, "k1"), ("p1", "no", False, "k1"),
                                         ("p2", "no", True, "k2"), ("p2", "yes", False, "k2")),
                           "eval": kto(("p3", "fine", True, "k3"), ("p3", "bad", False, "k3"))},
                {"train": pairs(("p1", "yes", "no", "k1"), ("p2", "no", "yes", "k2")),
                 "eval": pairs(("p3", "fine", "bad", "k3"))})
    snap = snapshot(tmp_path)
    assert snap.pairs("train").rows() == [("p1", "yes", "no", "k1", False, False),
                                          ("p2", "no", "yes", "k2", False, False)]
    assert snap.pairs("eval").rows() == [("p3", "fine", "bad", "k3", False, False)]
    assert snap.kto("eval").rows() == [("p3", "fine", True, "k3", False), ("p3", "bad", False, "k3", False)]
    assert (snap.rows("kto", "train"), snap.rows("kto", "eval"), snap.rows("pairs", "eval")) == (4, 2, 1)
    stored = pl.read_parquet(tmp_path / PAIRS_FILE)
    assert set(stored.columns) == {"prompt_key", "chosen_id", "rejected_id", "split"}  # no text in the pairs file


def test_a_cut_off_answer_stays_marked_and_older_files_read_as_ended(tmp_path):
    write_files(tmp_path, {"train": kto(("p1", "short", True, "k1", False),
                                        ("p1", "rambling on and", False, "k1", True), ("p2", "fine", True, "k2"))},
                {"train": pairs(("p1", "short", "rambling on and", "k1"))})
    snap = snapshot(tmp_path)
    assert dict(snap.kto("train").select("completion", "truncated").rows()) == {
        "short": False, "rambling on and": True, "fine": False}
    assert snap.pairs("train").select("chosen_truncated", "rejected_truncated").rows() == [(False, True)]
    kto_file = tmp_path / KTO_FILE  # a snapshot written before the column existed
    pl.read_parquet(kto_file).drop("truncated").write_parquet(kto_file)
    assert snap.kto("train")["truncated"].to_list() == [False, False, False]


def test_a_pair_must_be_two_labelled_answers_of_its_prompt_and_split(tmp_path):
    answers = {"train": kto(("p1", "yes", True, "k1"), ("p1", "no", False, "k1"), ("p2", "maybe", False, "k2"))}
    with pytest.raises(KtoLoopError, match="rejected answer that is not a kto row.*'maybe'"):
        write_files(tmp_path, answers, {"train": pairs(("p1", "yes", "maybe", "k1"))})  # another prompt's answer
    with pytest.raises(KtoLoopError, match="chosen answer that is not a kto row.*'yes'"):
        write_files(tmp_path, answers, {"eval": pairs(("p1", "yes", "no", "k1"))})  # another split
    with pytest.raises(KtoLoopError, match="repeat a completion under the same prompt"):
        write_files(tmp_path, {"train": kto(("p1", "yes", True, "k1"), ("p1", "yes", False, "k1"))}, {})


def test_a_pairs_file_naming_missing_answers_is_refused_with_its_name(tmp_path):
    write_files(tmp_path, {"train": kto(("p1", "yes", True, "k1"), ("p1", "no", False, "k1"))},
                {"train": pairs(("p1", "yes", "no", "k1"))})
    kto_file = tmp_path / KTO_FILE
    pl.read_parquet(kto_file).filter(pl.col("completion") == "yes").write_parquet(kto_file)  # drop an answer
    with pytest.raises(KtoLoopError, match=r"pairs.parquet: 1 train pair\(s\) name answers that are not"):
        snapshot(tmp_path).pairs("train")
    (tmp_path / PAIRS_FILE).unlink()
    with pytest.raises(KtoLoopError, match="snapshot file missing: .*pairs.parquet"):
        snapshot(tmp_path).pairs("train")
    with pytest.raises(KtoLoopError, match="unknown split 'test'"):
        snapshot(tmp_path).kto("test")


def test_a_first_format_snapshot_is_refused_with_the_remedy(tmp_path):
    (tmp_path / MANIFEST).write_text(Manifest("ds-old", "0" * 64, "v1", {}, {}).to_json())
    kto(("p1", "yes", True, "k1")).write_parquet(tmp_path / "kto_train.parquet")
    with pytest.raises(KtoLoopError, match="first format.*rebuild it with `ktoloop dataset build`"):
        load_snapshot(tmp_path)
