"""Our trainer against TRL's (KTOTrainer / DPOTrainer), in one run, on identical real data, model and shapes.

    .venv/bin/python benchmarks/bench_train.py                   # KTO: SmolLM2, HH-RLHF, demo LoRA + full FT
    .venv/bin/python benchmarks/bench_train.py --method dpo      # DPO on HH-RLHF same-prompt pairs
    .venv/bin/python benchmarks/bench_train.py --device cuda --batch-size 16 --max-length 256 --settings full

What users run: SmolLM2-135M-Instruct (its real weights and architecture, 30 layers x 576), real HH-RLHF
feedback from the packaged data, the demo's LoRA (r 16, alpha 32, q/k/v/o on the top 8 layers) and full
fine-tuning. Only examples whose chat-rendered prompt fits ``--max-prompt-length`` and whose whole sequence
fits ``--max-length`` are used, in file order, so neither trainer truncates and both see the same tokens
(lengths vary as in real feedback, so padding costs what it costs). Ours runs with ``--ours`` (default: the
shortcuts ``group_by_length`` and ``kl_pairs = batch/4``; ``exact`` turns them off); TRL at its defaults
(reference log-probs every step: LoRA disables the adapter, full fine-tuning keeps a frozen copy), or with
``precompute_ref_log_probs`` as ``trl-pre``. A last line times the tiny 2 x 64 Llama on synthetic text, as
the first version of this benchmark did, labelled as such.

Every (setting, trainer, repeat) runs in its own subprocess, so peak memory is its own (CPU: peak RSS, VmHWM;
CUDA: ``torch.cuda.max_memory_allocated``). Reported: steady samples/s (steps 2..n), end-to-end samples/s
(everything the call does: tokenising, reference log-probs, steps, saving) as min / median / max over
``--repeats``, and the first-step loss (KTO 0.5, DPO ln 2 = 0.6931: the policy equals the reference at step 1).
``--profile`` prints ``torch.profiler``'s top operators of one run of ours. TRL is needed only here:
``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, lora_layers=8)  # the demo's adapter (ktoloop.demo.toml)
FIRST_LOSS = {"kto": 0.5, "dpo": 0.6931}


# --------------------------------------------------------------------------------------------------- data

def hh_rows(tokenizer, method: str, n: int, max_length: int, max_prompt_length: int) -> list[dict]:
    """The first ``n`` HH-RLHF examples that fit untruncated: KTO rows (prompt, completion, label) or DPO
    pairs (prompt, chosen, rejected)."""
    from ingest.hh_rlhf import convert
    from ktoloop import data
    from training.data import encode_completion, render_prompt

    def fits(prompt_ids: list[int], response: str) -> bool:
        return len(prompt_ids) + len(encode_completion(tokenizer, response)) <= max_length

    events = list(convert(data.packaged_dir() / data.HH_RLHF_HARMLESS_TEST, "bench"))
    rows = []
    for up, down in zip(events[::2], events[1::2]):  # convert yields each pair as (up, down)
        prompt_ids = render_prompt(tokenizer, up["prompt"])
        if len(prompt_ids) > max_prompt_length:
            continue
        if method == "dpo":
            if fits(prompt_ids, up["response"]) and fits(prompt_ids, down["response"]):
                rows.append({"prompt": up["prompt"], "chosen": up["response"], "rejected": down["response"]})
        else:
            rows += [{"prompt": e["prompt"], "completion": e["response"], "label": e["label"] == "up"}
                     for e in (up, down) if fits(prompt_ids, e["response"])]
        if len(rows) >= n:
            return rows[:n]
    raise SystemExit(f"only {len(rows)} HH-RLHF examples fit {max_prompt_length}/{max_length} tokens; need {n}")


def synthetic_rows(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """The tiny row's data: KTO examples whose prompt and completion each take about seq_len/2 tokens."""
    from training.data import render_prompt

    rng = random.Random(seed)
    words = ("time person year way day thing man world life hand part child eye woman place work week case "
             "point number group problem fact river stone light music water paper colour").split()
    overhead = len(render_prompt(tokenizer, ""))
    return [{"prompt": " ".join(rng.choice(words) for _ in range(seq_len // 2 - overhead - 2)),
             "completion": " ".join(rng.choice(words) for _ in range(seq_len // 2 - 4)), "label": i % 2 == 0}
            for i in range(n)]


# ---------------------------------------------------------------------------------------------- trainers

def peak_memory(device: str) -> float:
    """CUDA: max allocated. CPU: this process's peak resident set (VmHWM: ``getrusage``'s ru_maxrss would
    report at least the parent's RSS at the fork, which is the benchmark's own)."""
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20  # kB -> GiB
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def run_ours(args, model_dir: Path, rows: list[dict], work: Path) -> dict:
    import polars as pl

    from ktoloop.snapshot import MANIFEST, Manifest, load_snapshot, write_files
    from training.config import TrainConfig
    from training.reference import pin_reference
    from training.trainer import train

    snap = work / "snapshot"
    frame = pl.DataFrame([{**r, "prompt_key": str(i)} for i, r in enumerate(rows)])
    if args.method == "dpo":
        answers = pl.concat([frame.select("prompt", pl.col(side).alias("completion"), "prompt_key")
                             .with_columns(label=pl.lit(side == "chosen")) for side in ("chosen", "rejected")])
        write_files(snap, {"train": answers.select("prompt", "completion", "label", "prompt_key")},
                    {"train": frame.select("prompt", "chosen", "rejected", "prompt_key")})
    else:
        write_files(snap, {"train": frame}, {})
    (snap / MANIFEST).write_text(Manifest("bench", "bench-" + str(len(rows)), "bench-v1",
                                          {"desirable": 1.0, "undesirable": 1.0}).to_json())
    reference = pin_reference(model_dir, "bench-v1", work / "home")
    shortcuts = {} if args.ours == "exact" or args.method != "kto" else dict(kl_pairs=max(1, args.batch_size // 4))
    config = TrainConfig(method=args.method, beta=0.1, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                         full_finetune=args.setting == "full", max_length=args.max_length,
                         max_prompt_length=args.max_prompt_length, device=args.device, max_grad_norm=1.0,
                         group_by_length=args.ours != "exact", **shortcuts, **LORA)
    start = time.perf_counter()
    train(config, load_snapshot(snap), reference, work / "out", cache_dir=work / "cache",
          override="benchmark: a hand-made snapshot")
    total = time.perf_counter() - start
    steps = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sum(s["seconds"] for s in steps[1:])  # step 1 includes one-off warm-up (allocations, kernels)
    return {"steady": (len(steps) - 1) * args.batch_size / step_seconds, "end_to_end": len(rows) / total,
            "first_loss": steps[0]["loss"], "peak_gib": peak_memory(args.device)}


def run_trl(args, model_dir: Path, rows: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def chat(prompt: str) -> str:  # the rendered chat prompt our trainer builds; TRL appends the eos
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)

    data = Dataset.from_list([{**r, "prompt": chat(r["prompt"])} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_model, peft_config = None, None
    if args.setting == "lora":
        from peft import LoraConfig

        layers = model.config.num_hidden_layers
        peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=0.0,
                                 task_type="CAUSAL_LM", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                 layers_to_transform=list(range(layers - LORA["lora_layers"], layers)),
                                 layers_pattern="layers")
    else:
        ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    Config, Trainer = (DPOConfig, DPOTrainer) if args.method == "dpo" else (KTOConfig, KTOTrainer)
    config = Config(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                    learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, beta=0.1,
                    max_length=args.max_length, logging_steps=1, save_strategy="no", report_to=[],
                    bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=False,
                    dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True, seed=0,
                    precompute_ref_log_probs=args.trainer == "trl-pre")

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []

        def on_step_begin(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if args.device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    timer = StepTimer()
    start = time.perf_counter()
    trainer = Trainer(model=model, ref_model=ref_model, args=config, train_dataset=data, processing_class=tokenizer,
                      callbacks=[timer], peft_config=peft_config)
    trainer.train()
    total = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steady": (len(timer.times) - 1) * args.batch_size / sum(timer.times[1:]),
            "end_to_end": len(rows) / total, "first_loss": losses[0], "peak_gib": peak_memory(args.device)}


def child(args) -> None:
    import torch
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    work, model_dir = Path(args.work), Path(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    n = args.batch_size * args.steps
    rows = (synthetic_rows(tokenizer, n, args.max_length) if args.model == "tiny"
            else hh_rows(tokenizer, args.method, n, args.max_length, args.max_prompt_length))
    run = run_ours if args.trainer == "ours" else run_trl
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = run(args, model_dir, rows, work)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
    else:
        result = run(args, model_dir, rows, work)
    print("RESULT " + json.dumps(result))


# ---------------------------------------------------------------------------------------------- the run

def model_dirs(args, work: Path) -> dict[str, Path]:
    from training.modeling import materialize_smollm2, random_llama_dir

    cache = Path(os.environ.get("KTOLOOP_CACHE", Path.home() / ".cache" / "ktoloop"))
    smollm2 = materialize_smollm2(cache / "smollm2-135m-instruct")
    return {"smollm2": smollm2, "tiny": random_llama_dir(work / "tiny", tokenizer_dir=smollm2, hidden_size=64,
                                                          layers=2)}


def spawn(args, model: str, model_dir: Path, setting: str, trainer: str, work: Path, profile: bool = False) -> dict:
    work.mkdir(parents=True)
    flags = ["--only", "--model", model, "--model-dir", str(model_dir), "--setting", setting, "--trainer", trainer,
             "--work", str(work), "--method", args.method, "--device", args.device, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
             "--max-prompt-length", str(args.max_prompt_length), "--lr", str(args.lr), "--ours", args.ours]
    done = subprocess.run([sys.executable, __file__, *flags, *(["--profile"] if profile else [])],
                          capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"{trainer} ({model}, {setting}) failed:\n{done.stderr[-4000:]}")
    if profile:
        print(done.stderr[done.stderr.find("----"):], flush=True)
    return json.loads(lines[-1][len("RESULT "):])


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} / {statistics.median(values):.2f} / {max(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("kto", "dpo"), default="kto")
    parser.add_argument("--settings", default="lora,full", help="comma-separated: lora (the demo's), full")
    parser.add_argument("--trainers", default="ours,trl", help="comma-separated: ours, trl, trl-pre")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160, help="the demo's [training] max_length")
    parser.add_argument("--max-prompt-length", type=int, default=96)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--ours", choices=("shortcuts", "exact"), default="shortcuts",
                        help="ours with group_by_length and kl_pairs = batch/4 (KTO), or with neither")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-model line")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops of one run of ours")
    parser.add_argument("--only", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("--model", "--model-dir", "--setting", "--trainer", "--work"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return child(args)

    settings, trainers = args.settings.split(","), args.trainers.split(",")
    rows: list[tuple] = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        dirs = model_dirs(args, work)
        if args.profile:
            spawn(args, "smollm2", dirs["smollm2"], settings[0], "ours", work / "profile", profile=True)
        plan = [("smollm2", s) for s in settings] + ([] if args.no_tiny else [("tiny", "full")])
        for model, setting in plan:
            results: dict[str, list[dict]] = {t: [] for t in trainers}
            for repeat in range(args.repeats if model == "smollm2" else 1):
                for trainer in trainers:  # interleaved, so a change in machine load hits every trainer
                    results[trainer].append(spawn(args, model, dirs[model], setting, trainer,
                                                  work / f"{model}-{setting}-{trainer}-{repeat}"))
                    r = results[trainer][-1]
                    print(f"{model} {setting} {trainer} #{repeat + 1}: steady {r['steady']:.2f}, end to end "
                          f"{r['end_to_end']:.2f} samples/s, {r['peak_gib']:.2f} GiB, first loss "
                          f"{r['first_loss']:.4f}", flush=True)
            rows.append((model, setting, results))

    mem = "peak RSS GiB" if args.device == "cpu" else "peak CUDA GiB"
    print(f"\n{args.method.upper()} training, {args.device}, batch {args.batch_size}, {args.steps} steps, "
          f"HH-RLHF <= {args.max_prompt_length}/{args.max_length} tokens, ours = {args.ours}, "
          f"samples/s as min / median / max of {args.repeats} runs\n")
    print(f"| model | setting | trainer | steady samples/s | end-to-end samples/s | {mem} (median) | first loss |")
    print("|---|---|---|---|---|---|---|")
    for model, setting, results in rows:
        label = "SmolLM2-135M-Instruct, HH-RLHF" if model == "smollm2" else "tiny Llama 2 x 64, synthetic text"
        name = "LoRA r16 top 8 (demo)" if setting == "lora" else "full FT"
        for trainer, runs in results.items():
            print(f"| {label} | {name} | {trainer} | {spread([r['steady'] for r in runs])} | "
                  f"{spread([r['end_to_end'] for r in runs])} | "
                  f"{statistics.median(r['peak_gib'] for r in runs):.2f} | {runs[0]['first_loss']:.4f} |")
    print()
    for model, setting, results in rows:
        ours = results.get("ours")
        for trainer in (t for t in results if t != "ours"):
            if not ours:
                continue
            med = {k: statistics.median(r[k] for r in ours) / statistics.median(r[k] for r in results[trainer])
                   for k in ("steady", "end_to_end", "peak_gib")}
            print(f"{model} {setting}: ours / {trainer} (medians): steady {med['steady']:.2f}x, end to end "
                  f"{med['end_to_end']:.2f}x, memory {med['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
