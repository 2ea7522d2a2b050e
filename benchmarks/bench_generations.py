"""The loop itself, generation after generation: does what users get improve?

    .venv/bin/python benchmarks/bench_generations.py [--generations 3] [--prompts 320] [--heldout 96]

A simulation of production on SmolLM2-135M-Instruct. Each generation, the serving model answers real prompts
(the first human turn of HH-RLHF harmless-base transcripts) by sampling with ``generate``; simulated users
rate each answer (``liked``, below); the events go through the real local broker and consumer stamped with
the serving model's ``model_version``; then the real retrain flow runs: drain, build, decide, train (KTO from
the serving model, which is also the frozen reference), gate, promote, export and pin. Held-out prompts never
enter training; on them, each generation reports the users' thumbs-up rate of fresh samples (± SE), the rate
of degenerate answers, the KL of the serving model to generation 0 (mean over its own samples of
log p_g(y|x) - log p_0(y|x), nats per answer) and the gate's decision and figures (capability included).

The simulated users like an answer when it is finished (ends with the end-of-turn token within
``max_new_tokens``), is 5 to 60 words long, names no dialogue role ("Human:", "Assistant:") and is not
degenerate. Degenerate (never liked): empty, under 3 words, one word repeated, a bare role tag. So a shorter,
complete answer is preferred and saying nothing is never rewarded.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import math
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

ROLE = re.compile(r"\b(Human|Assistant|User)\s*:", re.IGNORECASE)


def degenerate(text: str) -> bool:
    words = text.split()
    return len(words) < 3 or len({w.lower() for w in words}) == 1 or bool(ROLE.fullmatch(text.strip()))


def liked(text: str, finished: bool) -> bool:
    """The simulated users' documented, deterministic preference (see the module docstring)."""
    return finished and not degenerate(text) and 5 <= len(text.split()) <= 60 and not ROLE.search(text)


def hh_prompts(path: Path) -> list[str]:
    """The first human turn of each HH-RLHF transcript, deduplicated, in file order."""
    from ingest.hh_rlhf import convert

    seen: dict[str, None] = {}
    for event in convert(path, "unused"):
        first = event["prompt"].split("\n\nAssistant:")[0].replace("Human:", "", 1).strip()
        if 10 <= len(first) <= 300:
            seen.setdefault(first, None)
    return list(seen)


@dataclasses.dataclass
class Samples:
    prompts: list[str]
    texts: list[str]
    finished: list[bool]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]


def sample(model, tokenizer, prompts: list[str], per_prompt: int, max_new_tokens: int, seed: int,
           batch: int = 32) -> Samples:
    """``per_prompt`` sampled answers to each prompt, through the PPO rollout's sampler."""
    import torch

    from training.data import render_prompt
    from training.ppo import PPOConfig, generate

    config = PPOConfig(max_new_tokens=max_new_tokens, max_generated_tokens=10**9, device="cpu")
    torch.manual_seed(seed)
    out = Samples([], [], [], [], [])
    asked = [p for p in prompts for _ in range(per_prompt)]
    for start in range(0, len(asked), batch):
        chunk = asked[start: start + batch]
        ids = [render_prompt(tokenizer, p) for p in chunk]
        rollout = generate(model, ids, config, tokenizer.pad_token_id, tokenizer.eos_token_id, torch.device("cpu"))
        for prompt, prompt_ids, completion in zip(chunk, ids, rollout.completions):
            finished = bool(completion) and completion[-1] == tokenizer.eos_token_id
            out.prompts.append(prompt)
            out.texts.append(tokenizer.decode(completion, skip_special_tokens=True).strip())
            out.finished.append(finished)
            out.prompt_ids.append(prompt_ids)
            out.completion_ids.append(completion)  # the sampled tokens only: KL is over what was sampled
    return out


def kl_to_base(model, base_model, samples: Samples, pad_id: int) -> float:
    """Monte-Carlo KL(p_g || p_0) per answer: the mean over p_g's own samples of log p_g(y|x) - log p_0(y|x),
    summed over the sampled tokens only (an end-of-turn token appended to a cut-off answer was never sampled
    and would bias it: the first run, which appended one, printed -1.19 nats)."""
    import torch

    from training.data import Encoded
    from training.logprobs import compute_logps

    data = Encoded(samples.prompt_ids, samples.completion_ids, False, 10_000, 10_000)
    pairs = data.sequences(list(range(data.n)))
    mine = compute_logps(model, data, pairs, pad_id, torch.device("cpu"), 16)
    base = compute_logps(base_model, data, pairs, pad_id, torch.device("cpu"), 16)
    return float((mine - base).mean())


def rate(samples: Samples) -> tuple[float, float, float]:
    """(thumbs-up rate, its standard error, degenerate share)."""
    ups = [liked(t, f) for t, f in zip(samples.texts, samples.finished)]
    n = len(ups)
    p = sum(ups) / n
    return p, math.sqrt(p * (1 - p) / n), sum(degenerate(t) for t in samples.texts) / n


CONFIG = """
home = "{home}"
[kafka]
bootstrap_servers = "127.0.0.1:{port}"
topic = "sim-feedback"
partitions = 1
[broker]
port = {port}
[dataset]
holdout_fraction = 0.25
[training]
method = "kto"
max_steps = {steps}
batch_size = 16
lr = {lr}
warmup_steps = 5
beta = 0.1
max_length = 176
max_prompt_length = 96
lora_r = 16
lora_alpha = 32
lora_layers = 8
kl_pairs = {kl_pairs}
group_by_length = {group_by_length}
[monitoring]
quick_sizes = {{ arc_easy = {items}, piqa = {items} }}
[flows]
suite = "quick"
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=400, help="training prompts per generation (2 answers each)")
    parser.add_argument("--heldout", type=int, default=96, help="held-out prompts (2 answers each) for the rates")
    parser.add_argument("--steps", type=int, default=60, help="KTO steps per retrain (batch 16)")
    parser.add_argument("--lr", type=float, default=5e-4, help="LoRA learning rate of each retrain")
    parser.add_argument("--kl-pairs", type=int, default=0, help="[training] kl_pairs (0: all of the batch)")
    parser.add_argument("--group-by-length", action="store_true", help="[training] group_by_length")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--capability-items", type=int, default=300,
                        help="ARC-Easy and PIQA items the capability gate scores (150 lacked the power to pass an "
                             "unchanged model whose answers moved on many items)")
    parser.add_argument("--home", default="", help="state folder (default: a temporary one)")
    args = parser.parse_args()

    home = Path(args.home or tempfile.mkdtemp(prefix="ktoloop-sim-"))
    home.mkdir(parents=True, exist_ok=True)
    with socket.socket() as sock:  # a free loopback port for the simulation's own broker
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = home / "ktoloop.toml"
    config.write_text(CONFIG.format(home=home / "state", port=port, steps=args.steps, lr=args.lr,
                                      kl_pairs=args.kl_pairs, group_by_length=str(args.group_by_length).lower(),
                                      items=args.capability_items))
    os.environ["KTOLOOP_CONFIG"] = str(config)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

    from flows.lineage import serving_reference
    from flows.loop import store_of
    from flows.prefect_flows import retrain_flow
    from ingest.broker import LocalBroker
    from ingest.publish import publish
    from ingest.schema import encode_event
    from ktoloop import data
    from ktoloop.config import load_settings
    from training.modeling import load_model
    from training.reference import materialize_default

    settings = load_settings(config)
    base = materialize_default(settings.home_dir)
    broker = LocalBroker(settings.broker, settings.home_dir)
    broker.start()
    prompts = hh_prompts(settings.data_file(data.HH_RLHF_HARMLESS_TEST))
    heldout, pool = prompts[: args.heldout], prompts[args.heldout:]
    base_model, tokenizer = load_model(base.path, device="cpu")
    rows, started = [], time.monotonic()
    try:
        for generation in range(args.generations + 1):
            serving = serving_reference(settings, store_of(settings))
            model, _ = load_model(serving.path, device="cpu")
            held = sample(model, tokenizer, heldout, 2, args.max_new_tokens, seed=10_000 + generation)
            up, se, degenerate_share = rate(held)
            kl = kl_to_base(model, base_model, held, tokenizer.pad_token_id) if generation else 0.0
            row = {"generation": generation, "model_version": serving.model_version, "thumbs_up": up, "se": se,
                   "degenerate": degenerate_share, "kl_to_g0": kl, "gate": "", "minutes": 0.0}
            print(f"generation {generation} ({serving.model_version}): held-out thumbs-up {up:.3f} ± {se:.3f}, "
                  f"degenerate {degenerate_share:.3f}, KL to g0 {kl:.2f}", flush=True)
            print(f"   degenerate answers: {[t for t in held.texts if degenerate(t)][:8]}", flush=True)
            if generation == args.generations:
                rows.append(row)
                break
            batch = pool[generation * args.prompts: (generation + 1) * args.prompts]
            answers = sample(model, tokenizer, batch, 2, args.max_new_tokens, seed=generation)
            when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=generation)
            events = [{"event_id": f"sim-g{generation}-{k}", "prompt": p, "response": t or "(empty)",
                       "label": "up" if liked(t, f) else "down", "model_version": serving.model_version,
                       "event_time": (when + dt.timedelta(seconds=k)).isoformat(),
                       "prompt_id": "sim-" + hashlib.sha256(p.encode()).hexdigest()[:12], "source": "simulation"}
                      for k, (p, t, f) in enumerate(zip(answers.prompts, answers.texts, answers.finished))]
            publish(settings.kafka, [encode_event(e) for e in events])
            t0 = time.monotonic()
            outcome = retrain_flow(reason=f"simulation generation {generation + 1}")
            row.update(gate=f"{outcome['status']}: {outcome['reason']}", minutes=(time.monotonic() - t0) / 60)
            rows.append(row)
            print(f"   retrain -> {outcome['status']} in {row['minutes']:.1f} min: {outcome['reason']}", flush=True)
            del model
    finally:
        broker.stop()
    print("\n| generation | serving model_version | held-out thumbs-up (± SE) | degenerate | KL to g0 (nats) |"
          " next retrain |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['generation']} | `{r['model_version']}` | {r['thumbs_up']:.3f} ± {r['se']:.3f} | "
              f"{r['degenerate']:.3f} | {r['kl_to_g0']:.2f} | {r['gate'][:160]} |")
    print(f"\n{len(heldout) * 2} held-out samples per generation; total {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
