"""Training fixtures: a pinned tiny reference and a toy snapshot whose model version matches it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # train_helpers, for the test modules and the torchrun worker
from train_helpers import toy_snapshot  # noqa: E402


@pytest.fixture()
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture()
def tiny_reference(tiny_model_dir: Path, home: Path):
    from training.reference import pin_reference

    return pin_reference(tiny_model_dir, "tiny-v1", home)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory):
    return toy_snapshot(tmp_path_factory.mktemp("snapshots"))
