"""Which training setting earns a significant held-out gain on the real HH-RLHF feedback, in CPU minutes?

    .venv/bin/python benchmarks/bench_hh_sweep.py                       # every setting in SETTINGS
    .venv/bin/python benchmarks/bench_hh_sweep.py --only demo,lr1e-3 --holdout 0.15

The 4,606 HH-RLHF events (package data) are landed in a DuckDB file as the consumer lands them
(``ingest.landing.land``), the snapshot is built by the loop's builder, SmolLM2-135M-Instruct is pinned as
the demo pins it, and each setting is trained by ``training.trainer.train`` (its held-out scores are computed
there) and judged by the gate's own test (``flows.gate.paired_test``) against the reference, which ties every
pair (exactly 0.5). Every setting starts from ``[training]`` of ktoloop.demo.toml and changes only what its
name says. Prints one row per setting: held-out pairs n, pair accuracy with its standard error, the one-sided
95% lower bound of the accuracy (the reference's 0.5 plus the gate's bound on the gain; the gate promotes
when it is above 0.5), and the seconds spent training (reference log-probs included) - beta is one of the knobs, so
a choice made on this table is a choice made on held-out data, as the rules require.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SETTINGS: dict[str, dict] = {
    "demo": {},
    "dpo": {"method": "dpo"},
    "beta0.3": {"beta": 0.3},
    "lr1e-3": {"lr": 1e-3},
    "s32-256tok": {"max_steps": 32, "max_length": 256, "max_prompt_length": 160},
    "s60-b16-256tok": {"max_steps": 60, "batch_size": 16, "warmup_steps": 5, "max_length": 256,
                       "max_prompt_length": 160},
    "shortcuts": {"kl_pairs": 2, "group_by_length": True},  # the step shortcuts bench_train.py times
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated setting names (default: all)")
    parser.add_argument("--holdout", type=float, default=None, help="dataset.holdout_fraction (default: the demo's)")
    parser.add_argument("--home", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line per setting here")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")

    from flows.config import DatasetConfig
    from flows.dataset import build_dataset
    from flows.gate import paired_test
    from ingest.hh_rlhf import convert
    from ingest.landing import Batch, land
    from ingest.schema import EventDecoder, encode_event
    from ktoloop import data
    from ktoloop.config import load_section, load_settings
    from ktoloop.store import Store
    from training.config import TrainConfig
    from training.evaluate import reference_score
    from training.reference import DEFAULT_MODEL_VERSION, materialize_default
    from training.trainer import train

    settings = load_settings(REPO / "ktoloop.demo.toml")
    base = load_section(settings, "training", TrainConfig)
    dataset = load_section(settings, "dataset", DatasetConfig)
    if args.holdout is not None:
        dataset = dataclasses.replace(dataset, holdout_fraction=args.holdout)
    home = args.home or Path(tempfile.mkdtemp(prefix="hh-sweep-"))
    home.mkdir(parents=True, exist_ok=True)
    reference = materialize_default(settings.home_dir)  # the demo's pinned copy (materialised once per machine)

    store = Store(home / "feedback.duckdb")
    decoder = EventDecoder()
    events = [decoder.decode(encode_event(e)) for e in convert(settings.data_file(data.HH_RLHF_HARMLESS_TEST),
                                                                 DEFAULT_MODEL_VERSION)]
    land(store, "sweep", Batch(events=events, positions=[("hh", 0, i) for i in range(len(events))],
                               next_offsets={("hh", 0): len(events)}))
    built = build_dataset(store, home, dataset, DEFAULT_MODEL_VERSION)
    snapshot = built.snapshot
    print(f"snapshot {snapshot.manifest.snapshot_id}: holdout_fraction {dataset.holdout_fraction}, "
          f"{snapshot.rows('pairs', 'eval')} held-out pairs; base setting: {base.method} {base.max_steps} x "
          f"{base.batch_size}, lr {base.lr:g}, beta {base.beta:g}, {base.max_length}/{base.max_prompt_length} tokens, "
          f"LoRA r{base.lora_r} on the top {base.lora_layers} layers", flush=True)

    header = f"| setting | method | steps x batch | n | pair accuracy ± SE | 95% lower bound | verdict | train s |"
    rows = [header, "|" + "---|" * 8]
    scores: dict[str, list[float]] = {}
    for name in names:
        config = dataclasses.replace(base, **SETTINGS[name])
        t0 = time.perf_counter()
        result = train(config, snapshot, reference, home / "runs" / name, cache_dir=home / "cache",
                       override="benchmark", decision=built.decision)
        seconds = time.perf_counter() - t0
        mine = result.eval
        scores[name] = mine["scores"]
        test = paired_test(mine["scores"], reference_score(snapshot, config).scores, form=mine["form"])
        row = {"setting": name, "method": config.method, "steps": config.max_steps, "batch": config.batch_size,
               "lr": config.lr, "beta": config.beta, "max_length": config.max_length, "n": test.n,
               "accuracy": test.candidate, "stderr": test.stderr, "lower_bound": test.lower_bound,
               "passed": test.passed, "seconds": round(seconds, 1), "holdout": dataset.holdout_fraction}
        if args.out:
            with args.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        rows.append(f"| {name} | {config.method} | {config.max_steps} x {config.batch_size} | {test.n} | "
                    f"{test.candidate:.3f} ± {test.stderr:.3f} | {test.incumbent + test.lower_bound:.3f} | "
                    f"{'PROMOTE' if test.passed else 'reject'} | {seconds:.0f} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))
    for name in (n for n in names if n != "demo" and "demo" in scores):  # same held-out pairs: a paired difference
        diff = [a - b for a, b in zip(scores[name], scores["demo"], strict=True)]
        mean = sum(diff) / len(diff)
        se = (sum((d - mean) ** 2 for d in diff) / (len(diff) - 1) / len(diff)) ** 0.5
        print(f"{name} - demo on the same {len(diff)} held-out pairs: accuracy {mean:+.3f} ± {se:.3f} (paired SE)")


if __name__ == "__main__":
    main()
