"""The public data files shipped inside the package (benchmarks, HH-RLHF feedback), so a bare clone or a wheel runs.

Provenance and licences: ``PROVENANCE.md`` and ``LICENSES.md`` beside this file. The top-level ``data_dir``
setting points the code at another copy laid out the same way (``Settings.data_path``).
"""

from __future__ import annotations

from pathlib import Path

BENCHMARKS = "benchmarks"
"""Sub-folder with the capability-suite files that ``monitoring.tasks.TASKS`` name."""
HH_RLHF_HARMLESS_TEST = "feedback/hh_rlhf_harmless_base_test.jsonl.gz"
"""The real HH-RLHF preference pairs the demo and ``benchmarks/bench_ppo_hh.py`` publish as feedback."""


def packaged_dir() -> Path:
    """The folder holding the copies shipped with the package (this package's own folder)."""
    return Path(__file__).resolve().parent
