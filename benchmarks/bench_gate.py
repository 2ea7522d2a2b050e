"""Is the promotion gate calibrated? Train and gate many times on feedback with no signal and with a real one.

    .venv/bin/python benchmarks/bench_gate.py --runs 20

Each run lands its own feedback in a real DuckDB file, builds the snapshot, trains a KTO LoRA candidate on a
tiny Llama (SmolLM2 tokenizer) and applies the gate's preference test (``flows.gate.paired_test``) against the
reference on the held-out pairs, with a different seed each run:
  shuffled  the thumbs are permuted within the window, so labels carry no information: a promotion is a false
            promotion, and at the default 95% one-sided level at most 5% may happen;
  planted   a friendly answer is liked and a rude one is not, on every prompt: a learnable preference that
            the gate must promote in at least 18 of 20 runs.
Prints k/n promoted per condition with its 95% Clopper-Pearson interval.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VERSION = "tiny-v1"
OPENERS = ["Sure!", "Of course.", "Happy to help.", "Good question.", "Gladly."]
RUDE = ["no.", "not now.", "ask someone else.", "whatever.", "go away."]


def feedback(n_prompts: int, seed: int, shuffled: bool) -> list[dict]:
    """Two answers per prompt, one friendly and one rude, worded differently on each prompt."""
    rng = random.Random(seed)
    events = []
    for i in range(n_prompts):
        topic = f"topic {seed}-{i}"
        friendly = f"{rng.choice(OPENERS)} Here is a short note about {topic}. I hope it helps."
        rude = f"{rng.choice(RUDE)} {topic} is boring, {rng.choice(RUDE)}"
        for k, (response, label) in enumerate(((friendly, True), (rude, False))):
            events.append({"event_id": f"{seed}-{i}-{k}", "prompt": f"Tell me about {topic}.", "response": response,
                           "label": label, "model_version": VERSION, "event_time": 1_700_000_000 + 2 * i + k,
                           "prompt_id": f"p{seed}-{i}"})
    if shuffled:
        labels = [e["label"] for e in events]
        rng.shuffle(labels)
        events = [{**e, "label": label} for e, label in zip(events, labels)]
    return events


def gate_run(reference, root: Path, seed: int, shuffled: bool, n_prompts: int = 300):
    """Land, build, train, test one candidate; returns the gate's PreferenceTest."""
    from flows.dataset import DatasetConfig, build_dataset
    from ktoloop.methods import GateConfig
    from flows.gate import paired_test
    from ingest.landing import Batch, land
    from ingest.schema import EventDecoder, encode_event
    from ktoloop.store import Store
    from training.config import TrainConfig
    from training.evaluate import reference_score
    from training.trainer import train

    events = feedback(n_prompts, seed, shuffled)
    store = Store(root / "feedback.duckdb")
    decoder = EventDecoder()
    land(store, "g", Batch(events=[decoder.decode(encode_event(e)) for e in events],
                           positions=[("fb", 0, i) for i in range(len(events))],
                           next_offsets={("fb", 0): len(events)}))
    config = DatasetConfig(holdout_fraction=0.3, split_salt=f"seed-{seed}",
                           gates=GateConfig(min_examples=1, warn_examples=1, min_pairs=1))
    built = build_dataset(store, root, config, VERSION)
    snapshot = built.snapshot
    train_config = TrainConfig(method="kto", max_steps=12, batch_size=8, lr=2e-3, seed=seed, max_length=64,
                               max_prompt_length=32, lora_r=4, lora_alpha=8, lora_dropout=0.0, device="cpu")
    result = train(train_config, snapshot, reference, root / "candidate", decision=built.decision,
                   cache_dir=root / "cache")
    mine = result.eval
    return paired_test(mine["scores"], reference_score(snapshot, train_config).scores, form=mine["form"])


def clopper_pearson(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    alpha = 1 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def tiny_reference(root: Path):
    from training.modeling import materialize_smollm2, random_llama_dir
    from training.reference import pin_reference

    tokenizer_dir = materialize_smollm2(Path.home() / ".cache" / "ktoloop" / "smollm2-135m-instruct")
    return pin_reference(random_llama_dir(root / "tiny", tokenizer_dir=tokenizer_dir), VERSION, root / "home")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20, help="runs per condition (seeds 0..runs-1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reference = tiny_reference(Path(tmp))
        for condition in ("shuffled", "planted"):
            started, tests = time.monotonic(), []
            for seed in range(args.runs):
                tests.append(gate_run(reference, Path(tmp) / f"{condition}-{seed}", seed, condition == "shuffled"))
            k = sum(t.passed for t in tests)
            low, high = clopper_pearson(k, args.runs)
            mean_gain = sum(t.gain for t in tests) / len(tests)
            print(f"{condition:<9} promoted {k}/{args.runs} (95% CI {low:.3f}-{high:.3f}); mean gain "
                  f"{mean_gain:+.3f}, mean n {sum(t.n for t in tests) / len(tests):.0f} held-out pairs, "
                  f"{time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
