"""Power of the capability gate at the suite's sample sizes: how often an unchanged model passes, and how often
a model that truly lost 5 points does.

    .venv/bin/python benchmarks/bench_capability_power.py [--draws 4000] [--sizes 50,100,150,300]
        [--discordance 0.03,0.06,0.10] [--tolerance 0.04]

Each draw simulates paired per-item scores as ``monitoring.regression.paired_check`` sees them: the reference
right with probability 0.5 (the largest variance), the candidate answering a share ``discordance`` of items
differently in both directions (an unchanged model: the same accuracy, other mistakes), and the "dropped"
candidate additionally wrong on enough of its right items to lose 5 points in expectation. Discordance is
the fraction of items on which two models disagree; it sets the paired noise (``--measured RUN_A,RUN_B`` prints
the one between two stored suite runs). Prints pass rates with their binomial standard errors.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def simulate(n: int, discordance: float, drop: float, tolerance: float, draws: int, seed: int = 0,
             confidence: float = 0.95) -> float:
    """Share of ``draws`` in which ``paired_check`` passes a candidate with this true ``drop``."""
    from monitoring.regression import paired_check

    rng = random.Random(seed)
    passed = 0
    for _ in range(draws):
        reference = {i: float(rng.random() < 0.5) for i in range(n)}
        candidate = {}
        for i, right in reference.items():
            value = 1.0 - right if rng.random() < discordance else right
            if value == 1.0 and rng.random() < drop / (0.5 * (1 - discordance) + 0.5 * discordance):
                value = 0.0  # lose `drop` of accuracy in expectation, on items the candidate got right
            candidate[i] = value
        passed += paired_check("sim", "acc", reference, candidate, tolerance=tolerance, sampled=True,
                               confidence=confidence).passed
    return passed / draws


def measured_discordance(db: str, run_a: str, run_b: str) -> dict[str, float]:
    from ktoloop.store import Store
    from monitoring.harness import load_item_scores
    from monitoring.tasks import get_task

    a, b = load_item_scores(Store(db), run_a), load_item_scores(Store(db), run_b)
    out = {}
    for name in a.keys() & b.keys():
        metric = get_task(name).primary
        common = a[name][metric].keys() & b[name][metric].keys()
        out[name] = sum(a[name][metric][i] != b[name][metric][i] for i in common) / max(len(common), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=4000)
    parser.add_argument("--sizes", default="80,150,200,400")
    parser.add_argument("--discordance", default="0.03,0.06,0.10")
    parser.add_argument("--tolerance", type=float, default=0.04)
    parser.add_argument("--measured", default="", help="DB,RUN_A,RUN_B: print the discordance of two stored runs")
    args = parser.parse_args()
    if args.measured:
        db, run_a, run_b = args.measured.split(",")
        for name, value in sorted(measured_discordance(db, run_a, run_b).items()):
            print(f"discordance {name}: {value:.3f}")
    print(f"tolerance {args.tolerance}, {args.draws} draws per cell (binomial SE <= "
          f"{0.5 / math.sqrt(args.draws):.3f})")
    print("| n | discordance | unchanged passes | true 5-point drop passes |\n|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        for d in (float(x) for x in args.discordance.split(",")):
            same = simulate(n, d, 0.0, args.tolerance, args.draws, seed=1)
            dropped = simulate(n, d, 0.05, args.tolerance, args.draws, seed=2)
            print(f"| {n} | {d:.2f} | {same:.3f} | {dropped:.3f} |", flush=True)


if __name__ == "__main__":
    main()
