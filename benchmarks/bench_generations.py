"""The loop itself, generation after generation: does what users get improve?

    .venv/bin/python benchmarks/bench_generations.py [--stop-at 3] [--generations 5] [--lr 2e-4] [--top-p 1.0]

A simulation of production on SmolLM2-135M-Instruct. Each generation, the serving model answers real prompts
(the first human turn of HH-RLHF harmless-base transcripts) by sampling with ``generate``; simulated users
rate each answer (``liked``, below); the events go through the real local broker and consumer stamped with
the serving model's ``model_version`` and, as a serving stack reports it, whether ``max_new_tokens`` cut the
answer off (``truncated``: trained without an end-of-turn token); then the real retrain flow runs: drain,
build, decide, train (KTO from the serving model, which is also the frozen reference), gate, promote, export
and pin. Held-out prompts never enter training; on them, each generation reports the users' thumbs-up rate of
fresh samples (± SE), the rate of degenerate answers, the KL of the serving model to generation 0 (mean over
its own samples of log p_g(y|x) - log p_0(y|x), nats per answer) and the gate's decision and figures
(capability included).

With ``--canary-events N`` (the default), a candidate that passes the gate first answers the next batch of
prompts beside the serving model, as a canary; it is decided (``flows.loop.check_canary``, as the retrain
would first) on those ratings: promoted only when the users liked its answers significantly more often, and
the same round's retrain then trains the next model on its answers' feedback. The run stops once generation
``--stop-at`` serves, or after ``--generations`` retrains and one more batch for the last canary. Each served
generation's held-out rate is also compared with its parent's by the same two-proportion test.

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
           top_p: float = 1.0, batch: int = 32) -> Samples:
    """``per_prompt`` sampled answers to each prompt, through the PPO rollout's sampler (temperature 1)."""
    import torch

    from training.data import render_prompt
    from training.ppo import PPOConfig, generate

    config = PPOConfig(max_new_tokens=max_new_tokens, max_generated_tokens=10**9, device="cpu", top_p=top_p)
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


def rate(samples: Samples) -> tuple[int, int, float]:
    """(thumbs up, answers, degenerate share)."""
    ups = sum(liked(t, f) for t, f in zip(samples.texts, samples.finished))
    return ups, len(samples.texts), sum(degenerate(t) for t in samples.texts) / len(samples.texts)


def rated_events(samples: Samples, model_version: str, tag: str, day: int) -> list[dict]:
    """The simulated users' ratings of ``samples`` as feedback events stamped with the answering model's version,
    each saying whether ``max_new_tokens`` cut the answer off, as a serving stack reports it."""
    when = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc) + dt.timedelta(days=day)
    return [{"event_id": f"sim-{tag}-{k}", "prompt": p, "response": t or "(empty)",
             "label": "up" if liked(t, f) else "down", "model_version": model_version,
             "event_time": (when + dt.timedelta(seconds=k)).isoformat(),
             "prompt_id": "sim-" + hashlib.sha256(p.encode()).hexdigest()[:12], "source": "simulation",
             "truncated": not f}
            for k, (p, t, f) in enumerate(zip(samples.prompts, samples.texts, samples.finished))]


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
canary_events = {canary_events}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generations", type=int, default=5, help="retrains at most (each may promote a generation)")
    parser.add_argument("--stop-at", type=int, default=3, help="stop once this generation serves")
    parser.add_argument("--prompts", type=int, default=360, help="training prompts per batch (2 answers each)")
    parser.add_argument("--heldout", type=int, default=240,
                        help="held-out prompts (2 answers each) for the rates (480 samples: SE ~2 points at 0.2)")
    parser.add_argument("--steps", type=int, default=40, help="KTO steps per retrain (batch 16)")
    parser.add_argument("--lr", type=float, default=2e-4,
                        help="LoRA learning rate of each retrain (5e-4 gained +41 then +27 points but overshot into "
                             "8.7%% one-word replies: README)")
    parser.add_argument("--kl-pairs", type=int, default=4, help="[training] kl_pairs (0: all of the batch)")
    parser.add_argument("--group-by-length", action=argparse.BooleanOptionalAction, default=True,
                        help="[training] group_by_length")
    parser.add_argument("--canary-events", type=int, default=200,
                        help="[flows] canary_events: rated answers of each arm that decide a canary (0: no canary, "
                             "a candidate that passes the gate serves at once)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling of the served models' answers (at 0.9 the first generation gained far "
                             "less: README)")
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
                                      items=args.capability_items, canary_events=args.canary_events))
    os.environ["KTOLOOP_CONFIG"] = str(config)
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # as the CLI: no telemetry calls

    from flows import registry
    from flows.gate import proportion_test
    from flows.lineage import export_reference, serving_reference
    from flows.loop import check_canary, drain, store_of
    from flows.prefect_flows import retrain_flow
    from ingest.broker import LocalBroker
    from ingest.publish import publish
    from ingest.schema import encode_event
    from ktoloop import data
    from ktoloop.config import load_settings
    from training.modeling import load_model
    from training.reference import materialize_default

    settings = load_settings(config)
    store = store_of(settings)
    base = materialize_default(settings.home_dir)
    broker = LocalBroker(settings.broker, settings.home_dir)
    broker.start()
    prompts = hh_prompts(settings.data_file(data.HH_RLHF_HARMLESS_TEST))
    heldout, pool = prompts[: args.heldout], prompts[args.heldout:]
    base_model, tokenizer = load_model(base.path, device="cpu")
    served, decisions, started = [], [], time.monotonic()

    def measure(serving) -> None:
        """Held-out thumbs-up rate, degenerate share and KL to g0 of a newly serving model, vs its parent."""
        model, _ = load_model(serving.path, device="cpu")
        held = sample(model, tokenizer, heldout, 2, args.max_new_tokens, seed=10_000 + serving.generation,
                      top_p=args.top_p)
        ups, n, degenerate_share = rate(held)
        kl = kl_to_base(model, base_model, held, tokenizer.pad_token_id) if serving.generation else 0.0
        versus = proportion_test(ups, n, served[-1]["ups"], served[-1]["n"]) if served else None
        served.append({"generation": serving.generation, "model_version": serving.model_version, "ups": ups, "n": n,
                       "degenerate": degenerate_share, "kl_to_g0": kl, "versus": versus})
        print(f"generation {serving.generation} ({serving.model_version}): held-out thumbs-up {ups / n:.3f} "
              f"({ups}/{n}), degenerate {degenerate_share:.3f}, KL to g0 {kl:.2f}"
              + (f"; vs its parent (two-proportion z test): {versus.gain:+.3f} ± {versus.stderr:.3f}, 95% lower "
                 f"bound {versus.lower_bound:+.3f}: {'' if versus.passed else 'not '}significantly better"
                 if versus else ""), flush=True)
        print(f"   degenerate answers: {[t for t in held.texts if degenerate(t)][:8]}", flush=True)

    def answer(pin, batch: list[str], tag: str, step: int) -> list[dict]:
        model, _ = load_model(pin.path, device="cpu")
        return rated_events(sample(model, tokenizer, batch, 2, args.max_new_tokens, seed=step, top_p=args.top_p),
                            pin.model_version, tag, step)

    try:
        for step in range(args.generations + 1):
            serving = serving_reference(settings, store)
            if not served or served[-1]["model_version"] != serving.model_version:
                measure(serving)
            pending = registry.canary(store)
            if serving.generation >= args.stop_at or (step == args.generations and pending is None):
                break
            batch = pool[step * args.prompts: (step + 1) * args.prompts]
            events = answer(serving, batch, f"s{step}", step)
            if pending is not None:  # the canary answers the same prompts: its share of the traffic
                events += answer(export_reference(settings, pending), batch, f"c{step}", 1_000 + step)
            publish(settings.kafka, [encode_event(e) for e in events])
            t0, canary, line = time.monotonic(), "", "(none: the last batch decides the canary only)"
            if pending is not None:  # decided first, as the retrain would: a promotion may reach --stop-at
                drain(settings)
                verdict = check_canary(settings)
                canary = f"{verdict.status}: {verdict.reason}"
            if step < args.generations and serving_reference(settings, store).generation < args.stop_at:
                outcome = retrain_flow(reason=f"simulation retrain {step + 1}")
                line = f"{outcome['status']}: {outcome['reason']}"
            decisions.append({"step": step, "serving": serving.model_version, "minutes": (time.monotonic() - t0) / 60,
                              "canary": canary, "retrain": line})
            print(f"   step {step}: canary -> {canary or '(none)'}\n   retrain -> {line} "
                  f"({decisions[-1]['minutes']:.1f} min)", flush=True)
        serving = serving_reference(settings, store)
        if served[-1]["model_version"] != serving.model_version:
            measure(serving)
    finally:
        broker.stop()
    print("\n| generation | held-out thumbs-up (± SE) | vs parent: gain ± SE, 95% lower bound | degenerate | "
          "KL to g0 (nats) |\n|---|---|---|---|---|")
    for r in served:
        p, v = r["ups"] / r["n"], r["versus"]
        print(f"| {r['generation']} | {p:.3f} ± {math.sqrt(p * (1 - p) / r['n']):.3f} | "
              + (f"{v.gain:+.3f} ± {v.stderr:.3f}, {v.lower_bound:+.3f}" if v else "") +
              f" | {r['degenerate']:.3f} | {r['kl_to_g0']:.2f} |")
    print("\n| batch | serving | canary's live verdict | retrain |\n|---|---|---|---|")
    for d in decisions:
        print(f"| {d['step']} | `{d['serving']}` | {d['canary'][:220]} | {d['retrain'][:220]} |")
    print(f"\n{len(heldout) * 2} held-out samples per generation; total {(time.monotonic() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
