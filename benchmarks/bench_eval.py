"""Monitoring throughput: quick-suite items/s on SmolLM2-135M (CPU), and a drift report over 1M events.

    .venv/bin/python benchmarks/bench_eval.py                 # both
    .venv/bin/python benchmarks/bench_eval.py --skip-eval     # drift only (seconds)
    .venv/bin/python benchmarks/bench_eval.py --events 200000 --skip-drift
    .venv/bin/python benchmarks/bench_eval.py --packing      # packed vs one-row-per-sequence scoring only

Goal: the drift report over 1M events in <= 10 s (aggregation + tests + Evidently HTML/JSON + workspace).
``--packing``: what sharing a context's row (``training.packing``) saves on the demo's two scoring jobs, each
against the one-sequence-per-row path measured in the same run: the quick suite's ARC-Easy and PIQA requests,
and held-out HH-RLHF pairs through a LoRA policy's shared trunk (the gate's scoring).
"""

from __future__ import annotations

import argparse
import datetime as dt
import tempfile
import time
from pathlib import Path


def bench_eval(device: str) -> list[tuple[str, str]]:
    from monitoring.config import MonitorConfig
    from monitoring.harness import evaluate

    model, tok = _smollm2(device)
    started = time.perf_counter()
    results = evaluate(model, tok, "quick", config=MonitorConfig(), progress=False)
    total = time.perf_counter() - started
    rows = [(f"quick/{name}", f"{r.n} items, {r.seconds:6.1f} s, {r.n / r.seconds:6.2f} items/s") for name, r in
            results.items()]
    n = sum(r.n for r in results.values())
    rows.append(("quick suite (total)", f"{n} items, {total:6.1f} s, {n / total:6.2f} items/s on {device}"))
    return rows


def _smollm2(device: str):
    from training.modeling import load_model, materialize_smollm2

    return load_model(materialize_smollm2(Path.home() / ".cache" / "ktoloop" / "smollm2-135m-instruct"), device=device)


def _timed(run):
    started = time.perf_counter()
    out = run()
    return out, time.perf_counter() - started


def bench_packing(device: str, pairs: int) -> list[tuple[str, str]]:
    import torch

    from ingest.hh_rlhf import convert
    from ktoloop import data as packaged
    from ktoloop.config import load_settings
    from ktoloop.demo import DEMO_CONFIG
    from monitoring.config import load_monitor_config
    from monitoring.harness import sample_ids
    from monitoring.scoring import loglikelihood
    from monitoring.tasks import get_task
    from training.config import TrainConfig
    from training.data import Encoded, collate, encode_completion, render_prompt
    from training.logprobs import compute_policy_and_reference, policy_and_reference_logps, shared_trunk
    from training.runtime import make_trainable

    model, tok = _smollm2(device)
    config, rows = load_monitor_config(load_settings(DEMO_CONFIG)), []

    def line(name: str, n: int, unit: str, alone_s: float, packed_s: float, diff: float) -> tuple[str, str]:
        return (name, f"{n} {unit}: one per row {alone_s:6.1f} s, packed {packed_s:6.1f} s, "
                      f"{alone_s / packed_s:4.2f}x; max |difference| {diff:.1e} nats")

    for name, size in config.quick_sizes.items():  # the demo's quick suite
        task = get_task(name)
        items = task.items(config.benchmarks_path)
        requests = [r for i in sample_ids(name, len(items), size, config.seed)
                    for r in task.kind.requests(items[i], tok, config.max_length)]
        kwargs = dict(max_length=config.max_length, pad_id=tok.pad_token_id, progress=False)
        # before: a row per request in batches of 8,192 padded tokens (the earlier default)
        before, before_s = _timed(lambda: loglikelihood(model, requests, share_contexts=False, batch_tokens=8192,
                                                        **kwargs))
        alone, alone_s = _timed(lambda: loglikelihood(model, requests, share_contexts=False,
                                                      batch_tokens=config.batch_tokens, **kwargs))
        packed, packed_s = _timed(lambda: loglikelihood(model, requests, batch_tokens=config.batch_tokens, **kwargs))
        diff = max(abs(a.logprob - b.logprob) for a, b in zip(alone, packed))
        rows.append(line(f"packing: quick/{name} ({config.batch_tokens} tokens)", len(requests), "requests",
                         alone_s, packed_s, diff))
        rows.append(("  vs one per row at 8192 tokens", f"{before_s:6.1f} s: {before_s / packed_s:4.2f}x"))

    # the demo's held-out scoring: HH-RLHF pairs at 96/160 tokens, policy and reference through the shared trunk
    events = list(convert(packaged.packaged_dir() / packaged.HH_RLHF_HARMLESS_TEST, "bench"))[: 2 * pairs]
    chosen, rejected = events[0::2], events[1::2]
    data = Encoded([render_prompt(tok, e["prompt"]) for e in chosen],
                   [encode_completion(tok, e["response"]) for e in chosen + rejected], True, 160, 96)
    policy = make_trainable(model, TrainConfig(device=device, lora_layers=8, lora_dropout=0.0)).eval()
    sequences, shared, dev = data.sequences(list(range(data.n))), shared_trunk(policy), torch.device(device)

    @torch.no_grad()
    def one_per_row():  # the path before packing: length-sorted batches of 8 sequences
        order = sorted(range(len(sequences)), key=lambda k: sum(map(len, data.tokens(sequences[k]))))
        out = torch.zeros(len(sequences))
        for start in range(0, len(order), 8):
            chunk = order[start: start + 8]
            out[chunk] = policy_and_reference_logps(policy, collate(data, [sequences[k] for k in chunk],
                                                                    tok.pad_token_id, dev), shared)[0].cpu()
        return out

    alone, alone_s = _timed(one_per_row)
    (packed, _), packed_s = _timed(lambda: compute_policy_and_reference(policy, data, sequences, tok.pad_token_id,
                                                                         dev, 8, shared, "held-out"))
    rows.append(line("packing: held-out pairs, shared trunk", len(sequences), "sequences", alone_s, packed_s,
                     float((alone - packed).abs().max())))
    return rows


def bench_drift(events: int) -> list[tuple[str, str]]:
    from ktoloop.store import Store
    from monitoring.drift import Window, drift_finding
    from monitoring.reports import drift_report
    from monitoring.synthetic import feedback_frame, insert_feedback

    root = Path(tempfile.mkdtemp(prefix="bench_drift_"))
    store = Store(root / "k.duckdb")
    t0 = dt.datetime(2025, 1, 1, tzinfo=dt.timezone.utc)
    week = dt.timedelta(days=7)
    started = time.perf_counter()
    half = events // 2
    # reference: v1 only; current: v1 slightly worse, a new v2 with longer responses
    insert_feedback(store, feedback_frame(half, t0, t0 + week, up_rate=0.70, prompt_pool=50_000, seed=1))
    insert_feedback(store, feedback_frame(half * 8 // 10, t0 + week, t0 + 2 * week, up_rate=0.68,
                                          prompt_pool=50_000, seed=2))
    insert_feedback(store, feedback_frame(half - half * 8 // 10, t0 + week, t0 + 2 * week, up_rate=0.66,
                                          model_version="v2", response_chars=380, prompt_pool=50_000, seed=3))
    load_s = time.perf_counter() - started
    reference, current = Window(t0, t0 + week), Window(t0 + week, t0 + 2 * week)
    started = time.perf_counter()
    finding, table = drift_finding(store, reference, current)
    finding_s = time.perf_counter() - started
    import evidently  # noqa: F401  (import time is not report time)

    started = time.perf_counter()
    report = drift_report(store, root / "reports", reference=reference, current=current, workspace=root / "ws")
    report_s = time.perf_counter() - started
    return [
        ("drift: synthetic load", f"{events:,} events in {load_s:5.1f} s"),
        ("drift: finding (DuckDB + tests)", f"{finding_s:5.2f} s, {len(table)} count rows"),
        ("drift: full report", f"{report_s:5.2f} s (finding + Evidently HTML/JSON + workspace) "
                               f"{'OK' if report_s <= 10 else 'OVER'} vs 10 s goal"),
        ("drift: verdict", "; ".join(report.finding.reasons) or "no drift"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-eval", action="store_true")
    parser.add_argument("--skip-drift", action="store_true")
    parser.add_argument("--packing", action="store_true", help="only the packed-scoring comparison")
    parser.add_argument("--pairs", type=int, default=314, help="held-out pairs for --packing (the demo's)")
    args = parser.parse_args()
    if args.packing:
        args.skip_drift = args.skip_eval = True
    rows = bench_packing(args.device, args.pairs) if args.packing else []
    if not args.skip_drift:
        rows += bench_drift(args.events)
    if not args.skip_eval:
        rows += bench_eval(args.device)
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measure':<{width}}  result\n{'-' * width}  {'-' * 60}")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
