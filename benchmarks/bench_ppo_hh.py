"""PPO on SmolLM2-135M-Instruct against a reward model trained on the real HH-RLHF feedback, end to end.

The loop's own steps, in order: land the HH-RLHF harmless-base events (the chosen answer a thumbs up, the
rejected one a thumbs down) in a DuckDB file; pin SmolLM2 as the reference; snapshot; train and pin the
reward model on the snapshot; snapshot again (PPO is now eligible: enabled, budgeted, reward model pinned);
train the PPO candidate within its token budget; run the promotion gate (capability suite on the reference
and the candidate, held-out preference loss). Prints the reward model's held-out accuracy, reward and KL per
PPO step, and the capability scores before/after. Sized for 2 CPU cores (~1 h); on a GPU raise the sizes.

Usage: python benchmarks/bench_ppo_hh.py [--home DIR] [--reward-steps 240] [--ppo-tokens 23040]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import loop, registry  # noqa: E402
from flows.gate import Gate  # noqa: E402
from ingest.hh_rlhf import convert  # noqa: E402
from ingest.landing import Batch, land  # noqa: E402
from ingest.schema import EventDecoder, encode_event  # noqa: E402
from ktoloop import data  # noqa: E402
from ktoloop.config import load_section, load_settings  # noqa: E402
from ktoloop.store import Store  # noqa: E402

VERSION = "smollm2-135m-instruct-q4_1"

CONFIG = """
home = "{home}"
[dataset]
sources = ["hh-rlhf"]
holdout_fraction = 0.15
[dataset.gates]
ppo_enabled = true
ppo_budget_tokens = {ppo_tokens}
[reward]
max_steps = {reward_steps}
batch_size = 8
lr = 2e-4
max_length = 192
max_prompt_length = 128
lora_layers = 8
[ppo]
max_seconds = {ppo_seconds}
rollout_batch_size = 16
mini_batch_size = 8
ppo_epochs = 2
max_new_tokens = 48
lr = 2e-4
kl_coef = 0.05
max_prompt_length = 128
max_length = 192
lora_layers = 8
eval_every = 15
[training]
method = "dpo"
max_length = 192
max_prompt_length = 128
[flows]
suite = "quick"
drain_before_retrain = false
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".ktoloop-ppo-hh"))
    parser.add_argument("--reward-steps", type=int, default=240)
    parser.add_argument("--ppo-tokens", type=int, default=16 * 48 * 30, help="generated-token budget")
    parser.add_argument("--ppo-seconds", type=int, default=1800)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    config_path = home / "ktoloop.toml"
    config_path.write_text(CONFIG.format(home=home, ppo_tokens=args.ppo_tokens, reward_steps=args.reward_steps,
                                         ppo_seconds=args.ppo_seconds))
    settings = load_settings(config_path)
    hh_file = settings.data_file(data.HH_RLHF_HARMLESS_TEST)  # fails here, naming the file, before any work
    timings: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.perf_counter()
        out = fn(*a, **kw)
        timings[name] = time.perf_counter() - t0
        print(f"[{name}] {timings[name]:.0f} s", flush=True)
        return out

    store = Store(settings.home_dir / "ktoloop.duckdb")
    if store.scalar("SELECT count(*) FROM feedback") == 0:
        decoder = EventDecoder()
        events = [decoder.decode(encode_event(e)) for e in convert(hh_file, VERSION)]
        land(store, "bench", Batch(events=events, positions=[("feedback", 0, i) for i in range(len(events))],
                                   next_offsets={("feedback", 0): len(events)}))

    from training.reference import list_references, materialize_default
    from training.reward import RewardConfig, pin_reward_model, reward_model_for, train_reward

    reference = next((r for r in list_references(home) if r.model_version == VERSION), None) \
        or timed("materialise reference", materialize_default, home, VERSION)
    first = timed("snapshot", loop.build, settings)
    print("decision without a reward model:", "; ".join(first.decision.reasons))
    snapshot = first.snapshot
    reward = reward_model_for(reference, home)
    if reward is None:
        config = load_section(settings, "reward", RewardConfig)
        out = home / "reward_runs" / f"rm-{snapshot.manifest.snapshot_id}-{config.fingerprint()}"
        timed("reward model", train_reward, config, snapshot, reference, out)
        reward = pin_reward_model(out, home, f"rm-{snapshot.manifest.snapshot_id}")
    again = loop.build(settings, method="ppo")  # raises when PPO is not eligible
    print("decision with a reward model:", "; ".join(again.decision.reasons),
          f"(ppo: {again.decision.eligibility['ppo']['reason']})")
    candidate = timed("ppo", loop.train_candidate, settings, again.snapshot.manifest.snapshot_id, "ppo")
    gate = timed("gate (capability before/after)", loop.evaluate_candidate, settings, candidate.model_id)
    report(reward, candidate, gate, timings)


def report(reward, candidate: registry.Candidate, gate: Gate, timings: dict[str, float]) -> None:
    meta = json.loads((Path(candidate.adapter_path) / "training_meta.json").read_text())
    steps = [json.loads(line) for line in (Path(candidate.adapter_path) / "metrics.jsonl").read_text().splitlines()]
    ev = reward.eval or {}
    print(f"\nreward model {reward.name}: held-out pair accuracy {ev.get('pair_accuracy', float('nan')):.3f} "
          f"on {ev.get('pairs')} pairs (chance 0.5), mean margin {ev.get('pair_margin', float('nan')):+.3f}")
    print("\n| PPO step | reward (score) | KL to ref (nats/seq) | tokens | held-out pair acc |")
    print("|---:|---:|---:|---:|---:|")
    for s in steps:
        accuracy = format(s["eval_accuracy"], ".3f") if "eval_accuracy" in s else ""
        print(f"| {s['step']} | {s['reward']:+.3f} | {s['kl']:.3f} | {s['tokens_total']} | {accuracy} |")
    k = max(1, len(steps) // 4)
    early = sum(s["reward"] for s in steps[:k]) / k
    late = sum(s["reward"] for s in steps[-k:]) / k
    print(f"\nmean reward, first {k} steps {early:+.3f} -> last {k} steps {late:+.3f} ({late - early:+.3f}); "
          f"stop: {meta.get('stop', {}).get('reason')} {meta.get('stop', {}).get('detail', '')}")
    held = meta.get("heldout_reward") or {}
    if held:
        print(f"held-out prompts ({held['prompts']}, same seed): reward reference {held['reference_reward']:+.3f} -> "
              f"PPO policy {held['policy_reward']:+.3f} (paired gain {held['gain']:+.3f} ± {held['gain_stderr']:.3f} SE); "
              f"policy KL to reference {held['policy_kl']:.3f} nats/sequence")
    print("\n| benchmark | metric | reference | PPO candidate | delta | drop upper bound < tolerance |")
    print("|---|---|---:|---:|---:|---:|")
    for c in gate.capability["checks"]:
        print(f"| {c['benchmark']} (n={c['n']}) | {c['metric']} | {c['reference']:.4f} | {c['candidate']:.4f} | "
              f"{c['candidate'] - c['reference']:+.4f} | {c['upper_bound']:.4f} < {c['tolerance']:.4f} |")
    print(f"\ngate: {'PASSED' if gate.passed else 'FAILED'}: {gate.summary}")
    print("timings: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()))


if __name__ == "__main__":
    main()
