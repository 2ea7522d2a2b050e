"""Pinned references: hashes recorded, any change refused by file name, model versions must match."""

import shutil

import pytest

from ktoloop.cli import main
from ktoloop.errors import KtoLoopError
from training.reference import load_reference, pin_reference, reference_for_snapshot


@pytest.fixture()
def model_copy(tiny_model_dir, tmp_path):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


def test_pin_records_every_weight_and_tokenizer_file(model_copy, home):
    ref = pin_reference(model_copy, "tiny-v1", home)
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(ref.files)
    assert all(len(h) == 64 for h in ref.files.values())
    assert load_reference("tiny-v1", home) == ref
    ref.verify()


def test_changed_weight_file_is_refused_by_name(model_copy, home):
    ref = pin_reference(model_copy, "tiny-v1", home)
    with (model_copy / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    with pytest.raises(KtoLoopError, match=r"model\.safetensors changed since it was pinned"):
        ref.verify()


def test_missing_and_added_files_are_refused(model_copy, home):
    ref = pin_reference(model_copy, "tiny-v1", home)
    (model_copy / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(KtoLoopError, match="extra.safetensors was added"):
        ref.verify()
    (model_copy / "extra.safetensors").unlink()
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(KtoLoopError, match="tokenizer.json is missing"):
        ref.verify()


def test_snapshot_model_version_must_match(model_copy, home):
    pin_reference(model_copy, "tiny-v1", home)
    with pytest.raises(KtoLoopError, match="no pinned reference for model version 'other-v2'"):
        reference_for_snapshot("other-v2", home)
    with pytest.raises(KtoLoopError, match=r"'other-v2'.*'tiny-v1'"):
        reference_for_snapshot("other-v2", home, name="tiny-v1")
    assert reference_for_snapshot("tiny-v1", home).model_version == "tiny-v1"


def test_pin_refuses_directory_without_weights(tmp_path, home):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")
    with pytest.raises(KtoLoopError, match="no weight file"):
        pin_reference(tmp_path / "m", "v", home)


def test_cli_pin_and_show(model_copy, home, monkeypatch, capsys):
    monkeypatch.setenv("KTOLOOP_HOME", str(home))
    monkeypatch.chdir(model_copy.parent)
    assert main(["reference", "pin", str(model_copy), "--model-version", "tiny-v1"]) == 0
    assert main(["reference", "show", "--verify"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert any(r.split()[:2] == ["tiny-v1", "tiny-v1"] and r.split()[-1] == "yes" for r in rows), rows  # verified
    (model_copy / "config.json").write_text("{}")
    assert main(["reference", "show", "--verify"]) == 2                 # KtoLoopError -> clean exit 2
    assert "config.json changed" in capsys.readouterr().err
