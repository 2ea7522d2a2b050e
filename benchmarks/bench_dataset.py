"""Dataset build speed and memory on N realistic feedback events (default 10M) in a real DuckDB file.

Events are generated inside DuckDB (a pool of prompts with ids, 2-4 answers per prompt visit, a few hundred
bytes of text each, ~3% conflicting labels, 5% from another model version, some exact duplicates, 10% cut off
at the serving token limit). The build then runs in a fresh child process, so its peak RSS is the build's
alone.
Usage: python benchmarks/bench_dataset.py [--events 10000000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows.dataset import DatasetConfig, build_dataset  # noqa: E402
from ktoloop.store import Store  # noqa: E402

VERSION = "smollm2-135m-instruct-q4_1"
WORDS = ("the a to of and in that is for it with as on be this you are can your by or from not have more first "
         "step when should because most people usually start simple practice time example good important "
         "remember avoid check plan try keep list small make sure result").split()

# j is the answer an event is about: usually its own, but every 50th event repeats the previous answer with
# the same label (an exact duplicate) and every 33rd repeats it with the opposite label (a conflict).
GENERATE = """
INSERT INTO feedback
SELECT 'ev-' || i AS event_id,
       'Question ' || (j // 3) % $prompts || ': ' || $words[(1 + hash(j // 3 % $prompts, 1) % $nwords)::BIGINT] || ' ' ||
           repeat($words[(1 + hash(j // 3 % $prompts, 2) % $nwords)::BIGINT] || ' ', 20) || 'how should I start?',
       'Answer ' || j || '. ' ||
           repeat($words[(1 + hash(j, 3) % $nwords)::BIGINT] || ' ' || $words[(1 + hash(j, 4) % $nwords)::BIGINT] || ' ', 30),
       CASE WHEN i % 33 = 0 THEN hash(j, 5) % 10 >= 7 ELSE hash(j, 5) % 10 < 7 END AS label,
       CASE WHEN j % 20 = 0 THEN 'older-model' ELSE $version END AS model_version,
       TIMESTAMPTZ '2026-11-01' + to_seconds(i // 100) AS event_time,
       'p' || (j // 3) % $prompts AS prompt_id, NULL, 'u' || i % 100000, 'web', NULL,
       'feedback', (i % 3)::INTEGER, i // 3, now(),
       j % 10 = 0 AS truncated  -- one answer in ten cut off at the serving token limit
FROM (SELECT i, CASE WHEN i % 33 = 0 OR i % 50 = 7 THEN i - 1 ELSE i END AS j FROM range($n) t(i))
"""


def generate(path: Path, n: int) -> float:
    started = time.monotonic()
    store = Store(path)
    with store.writer() as con:
        con.execute("SET enable_progress_bar = false")
        con.execute(GENERATE, {"n": n, "prompts": max(1, n // 12), "words": WORDS, "nwords": len(WORDS), "version": VERSION})
    return time.monotonic() - started


def build(path: str, home: str, queue: mp.Queue) -> None:
    started = time.monotonic()
    result = build_dataset(Store(path), home, DatasetConfig(), VERSION)
    seconds = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    queue.put((seconds, peak, result.snapshot.manifest.counts, result.decision.method))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--keep", help="work directory to keep (default: a temp dir, removed)")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-dataset-"))
    work.mkdir(parents=True, exist_ok=True)
    db = work / "feedback.duckdb"
    try:
        gen_seconds = generate(db, args.events) if not db.exists() else 0.0
        size_gb = db.stat().st_size / 1e9
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=build, args=(str(db), str(work / "home"), queue))
        proc.start()
        seconds, peak_mib, counts, method = queue.get()
        proc.join()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.events:,} events generated in {gen_seconds:.0f} s ({size_gb:.1f} GB DuckDB file)\n")
    print(f"{'step':<40} {'value':>14}")
    print(f"{'build seconds (goal <= 15 s)':<40} {seconds:>14.1f}")
    print(f"{'events/s':<40} {args.events / seconds:>14,.0f}")
    print(f"{'peak RSS of the build process (MiB)':<40} {peak_mib:>14,.0f}")
    for key in ("excluded_other_versions", "duplicates_collapsed", "conflicts", "kto_train_desirable",
                "kto_train_undesirable", "pairs_train", "pairs_eval", "prompts"):
        print(f"{key:<40} {counts[key]:>14,}")
    print(f"{'decision':<40} {method!s:>14}")
    print(f"\nratio to goal: {15 / seconds:.2f}x (>= 1 meets the 15 s goal)")


if __name__ == "__main__":
    main()
