"""The repository stands on its own: no code or config names a path outside the checkout, and the data the
demo and the capability suites read is packaged in ktoloop/data (and listed in pyproject's package-data)."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from ktoloop import data
from ktoloop.config import ConfigError, Settings

REPO = Path(__file__).resolve().parents[1]
THIS = PurePosixPath(Path(__file__).resolve().relative_to(REPO).as_posix())

# Code and config; prose (Markdown) and the data files themselves are not scanned.
SCANNED_SUFFIXES = {".py", ".toml", ".cfg", ".ini", ".yaml", ".yml", ".sh", ".txt"}
SCANNED_NAMES = {"Makefile", "Dockerfile"}
SCANNED_DIRS = {".ci", ".github"}

# `Path(__file__)` (optionally resolved) followed by `.parent`s and/or `.parents[k]`.
_FILE_CLIMB = re.compile(r"Path\(__file__\)(?:\.resolve\(\)|\.absolute\(\))?(?P<up>(?:\.parent\b)*)"
                         r"(?:\.parents\[(?P<k>\d+)\])?")
_DIRNAME_CLIMB = re.compile(r"(?P<up>(?:(?:os\.path\.)?dirname\(\s*)+)(?:os\.path\.abspath\()?__file__")
OUTSIDE = [
    # a relative path that starts by going up: "../x", '..\\x', or ".." as a joined component
    ("relative path leaving the checkout", re.compile(r"(?<![\w.)}\]$/\\])\.\.[/\\]|[\"']\.\.[\"']")),
    # a folder beside the checkout, joined piece by piece or written out
    ("the shared folder beside the checkout",
     re.compile(r"/\s*[\"']shared[\"']|[\"']shared[\"']\s*(?:/|,\s*[\"']data[\"'])|\bshared/data\b")),
    # absolute paths of the machine the project was developed on
    ("absolute path of a development machine", re.compile(r"(?<![\w.~-])/(?:work|root)/")),
]


def outside_references(rel: PurePosixPath, text: str) -> list[str]:
    """``path:line: reason: text`` for each reference in ``text`` (the file at ``rel``) to a path outside the repo."""
    depth = len(rel.parts) - 1  # parents[depth] of a file is the repository root
    found = []
    for no, line in enumerate(text.splitlines(), 1):
        reasons = [why for why, pattern in OUTSIDE if pattern.search(line)]
        for m in _FILE_CLIMB.finditer(line):
            up = m["up"].count(".parent") + (int(m["k"]) + 1 if m["k"] is not None else 0)
            if up > depth + 1:
                reasons.append(f"__file__ climbs {up} levels from a file {depth} folder(s) deep")
        for m in _DIRNAME_CLIMB.finditer(line):
            if m["up"].count("dirname(") > depth + 1:
                reasons.append("dirname(__file__) climbs above the repository root")
        found += [f"{rel}:{no}: {why}: {line.strip()}" for why in reasons]
    return found


def repo_files() -> list[PurePosixPath]:
    """Tracked files plus new ones git does not ignore (so an uncommitted file is checked too)."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                             capture_output=True, check=True).stdout.decode()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"git ls-files failed in {REPO} ({exc}); run the tests from a git checkout")
    return [PurePosixPath(p) for p in out.split("\0") if p and (REPO / p).is_file()]


def scanned(rel: PurePosixPath) -> bool:
    if rel == THIS or (rel.parts[:2] == ("ktoloop", "data") and rel.name != "__init__.py"):
        return False
    return rel.suffix in SCANNED_SUFFIXES or rel.name in SCANNED_NAMES or rel.parts[0] in SCANNED_DIRS


def test_no_file_names_a_path_outside_the_repository():
    files = [rel for rel in repo_files() if scanned(rel)]
    assert any(rel.name == "Makefile" for rel in files) and any(rel.parts[0] == ".ci" for rel in files)
    found = [hit for rel in files for hit in outside_references(rel, (REPO / rel).read_text(errors="replace"))]
    assert not found, ("paths outside the checkout (ship the data under ktoloop/data and read it through "
                       "Settings.data_file / data_dir):\n" + "\n".join(found))


@pytest.mark.parametrize("rel, line", [
    ("tests/conftest.py", 'SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"'),
    ("flows/demo.py", 'HH_FILE = Path(__file__).resolve().parents[2] / "x" / "feedback" / "hh.jsonl.gz"'),
    ("tests/conftest.py", "ROOT = Path(__file__).parent.parent.parent"),
    ("bench.py", "here = os.path.dirname(os.path.dirname(__file__))"),
    ("ingest/cli.py", 'help="e.g. ../shared/data/feedback/hh_rlhf_harmless_base_test.jsonl.gz"'),
    ("monitoring/benchmarks.py", '"""Benchmark files -> items. Formats: shared/data/PROVENANCE.md.'),
    ("monitoring/config.py", 'DIR = os.path.join(ROOT, "shared", "data")'),
    ("Makefile", "DATA ?= /work/shared/data"),
    ("tests/x.py", 'base = Path.cwd() / ".." / "data"'),
])
def test_scanner_flags_todays_outside_references(rel, line):
    assert outside_references(PurePosixPath(rel), line)


@pytest.mark.parametrize("rel, line", [
    ("tests/training/test_trainer.py", '"PYTHONPATH": str(Path(__file__).resolve().parents[2])'),
    ("ktoloop/demo.py", 'DEMO_CONFIG = Path(__file__).resolve().parents[1] / "ktoloop.demo.toml"'),
    ("benchmarks/bench_ingest.py", "sys.path.insert(0, str(Path(__file__).resolve().parents[1]))"),
    (".ci/run", 'cd "$(dirname "$0")/.."'),
    ("training/reward.py", "# read by training.runtime.make_trainable (shared LoRA set-up)"),
    ("tests/training/test_trainer.py", 'assert list(glob("reflogps-*.pt"))  # shared cache under <home>/cache'),
    ("flows/loop.py", "from ..store import Store  # relative import, then an ellipsis..."),
    ("tests/test_config.py", """cfg.write_text('home = "/tmp/h"')"""),
])
def test_scanner_passes_paths_inside_the_repository(rel, line):
    assert not outside_references(PurePosixPath(rel), line)


def _needed_files() -> set[str]:
    """Every file the demo, the quick suite and the full suite read, relative to the data folder."""
    from monitoring.config import MonitorConfig
    from monitoring.tasks import get_task

    defaults = MonitorConfig()
    demo = tomllib.loads((REPO / "ktoloop.demo.toml").read_text()).get("monitoring", {})
    names = {*defaults.quick_sizes, *defaults.full_benchmarks, *demo.get("quick_sizes", {})}
    return {f"{data.BENCHMARKS}/{get_task(n).filename}" for n in names} | {data.HH_RLHF_HARMLESS_TEST}


def _packaged_files() -> set[str]:
    root = data.packaged_dir()
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix not in {".py", ".md", ".pyc"}}


def test_packaged_data_has_every_file_the_demo_and_suites_read():
    missing = sorted(_needed_files() - _packaged_files())
    assert not missing, f"not in {data.packaged_dir()}: {missing}; copy them there and list them in PROVENANCE.md"
    for name in _needed_files():
        assert Settings().data_file(name).stat().st_size > 0  # the default data_dir is the packaged folder


def test_demo_reads_hh_rlhf_from_data_dir_and_names_the_setting_when_missing(tmp_path):
    from ktoloop.demo import run_demo

    with pytest.raises(ConfigError, match=r"harmless_base_test\.jsonl\.gz not found; set the top-level data_dir"):
        run_demo(Settings(data_dir=str(tmp_path), home=str(tmp_path / "home")))  # fails before any work
    assert not (tmp_path / "home").exists()


def test_every_packaged_file_is_shipped_in_the_wheel_with_provenance_and_licence():
    root = data.packaged_dir()
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["ktoloop.data"]
    provenance = (root / "PROVENANCE.md").read_text()
    licences = (root / "LICENSES.md").read_text()
    for name in sorted(_packaged_files() | {"PROVENANCE.md", "LICENSES.md"}):
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"{name} matches no [tool.setuptools.package-data] glob"
    for name in sorted(_packaged_files()):
        row = next((line for line in provenance.splitlines() if line.startswith(f"| {name} |")), None)
        assert row, f"ktoloop/data/PROVENANCE.md has no row for {name}"
        sha = hashlib.sha256((root / name).read_bytes()).hexdigest()
        assert sha in row, f"{name} changed: sha256 {sha} is not the one in PROVENANCE.md (files ship unchanged)"
        assert os.path.basename(name) in licences, f"ktoloop/data/LICENSES.md names no licence for {name}"
