"""Our KTO trainer against TRL's KTOTrainer, in one run, on identical data, model and shapes.

    .venv/bin/python benchmarks/bench_train.py                 # CPU: tiny Llama (SmolLM2 tokenizer), full FT
    .venv/bin/python benchmarks/bench_train.py --device cuda   # SmolLM2-135M, batch 16, 256 tokens, full FT

Each trainer runs in its own subprocess so peak memory is its own (CPU: peak RSS; CUDA:
torch.cuda.max_memory_allocated). Reported per trainer: steady-state samples/s (training steps only),
end-to-end samples/s (everything the call does: tokenising, reference log-probs, steps, saving) and the
first-step loss (both should be 0.5: the policy equals the reference at step 1, lambda_D = lambda_U = 1).
TRL is needed only here: ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_texts(tokenizer, n: int, seq_len: int, seed: int = 0) -> list[dict]:
    """n KTO examples whose rendered prompt and completion each take about seq_len/2 tokens."""
    from training.data import encode_completion, render_prompt

    rng = random.Random(seed)
    words = [w for w in ("time person year way day thing man world life hand part child eye woman place work week "
                         "case point number group problem fact river stone light music water paper colour").split()]
    overhead = len(render_prompt(tokenizer, ""))
    rows = []
    for i in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(seq_len // 2 - overhead - 2))
        completion = " ".join(rng.choice(words) for _ in range(seq_len // 2 - 4))
        rows.append({"prompt": prompt, "completion": completion, "label": i % 2 == 0})
    longest = max(len(render_prompt(tokenizer, r["prompt"])) + len(encode_completion(tokenizer, r["completion"]))
                  for r in rows)
    assert longest <= seq_len, f"generated sequences are {longest} tokens > {seq_len}"
    return rows


def build_model(args, work: Path) -> Path:
    from training.modeling import materialize_smollm2, random_llama_dir

    cache = Path(os.environ.get("KTOLOOP_CACHE", Path.home() / ".cache" / "ktoloop"))
    smollm2 = materialize_smollm2(cache / "smollm2-135m-instruct")
    if args.device == "cuda":
        return smollm2  # the real SmolLM2-135M-Instruct weights and architecture
    return random_llama_dir(work / "tiny", tokenizer_dir=smollm2, hidden_size=args.hidden, layers=args.layers)


def peak_memory(device: str) -> float:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux


def run_ours(args, model_dir: Path, rows: list[dict], work: Path) -> dict:
    import polars as pl

    from ktoloop.snapshot import MANIFEST, Manifest, load_snapshot, write_files
    from training.config import TrainConfig
    from training.reference import pin_reference
    from training.trainer import train

    snap = work / "snapshot"
    snap.mkdir()
    write_files(snap, {"train": pl.DataFrame([{**r, "prompt_key": str(i)} for i, r in enumerate(rows)])}, {})
    (snap / MANIFEST).write_text(Manifest("bench", "bench-" + str(len(rows)), "bench-v1",
                                          {"desirable": 1.0, "undesirable": 1.0}, {}).to_json())
    reference = pin_reference(model_dir, "bench-v1", work / "home")
    config = TrainConfig(method="kto", beta=0.1, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size,
                         full_finetune=not args.lora, lora_dropout=0.0, max_length=args.seq_len,
                         max_prompt_length=args.seq_len // 2, device=args.device, max_grad_norm=1.0)
    start = time.perf_counter()
    train(config, load_snapshot(snap), reference, work / "out", cache_dir=work / "cache",
          override="benchmark: a hand-made snapshot of synthetic rows")
    total = time.perf_counter() - start
    steps = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    step_seconds = sum(s["seconds"] for s in steps[1:])  # step 1 includes one-off warm-up (allocations, kernels)
    return {"steady": (len(steps) - 1) * args.batch_size / step_seconds, "end_to_end": len(rows) / total,
            "first_loss": steps[0]["loss"], "peak_gib": peak_memory(args.device)}


def run_trl(args, model_dir: Path, rows: list[dict], work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    # The same rendered chat prompt our trainer builds; TRL appends the eos (<|im_end|>) to the completion.
    data = Dataset.from_list([{"prompt": tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                                        add_generation_prompt=True, tokenize=False),
                               "completion": r["completion"], "label": r["label"]} for r in rows])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        ref_model, peft_config = None, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    config = KTOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=args.batch_size,
                       max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0,
                       beta=0.1, max_length=args.seq_len, logging_steps=1, save_strategy="no", report_to=[],
                       bf16=args.device == "cuda", use_cpu=args.device == "cpu", gradient_checkpointing=False,
                       dataloader_num_workers=0, max_grad_norm=1.0, disable_tqdm=True, seed=0)

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
    trainer = KTOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[timer], peft_config=peft_config)
    trainer.train()
    total = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steady": (len(timer.times) - 1) * args.batch_size / sum(timer.times[1:]),
            "end_to_end": len(rows) / total, "first_loss": losses[0], "peak_gib": peak_memory(args.device)}


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    work = Path(args.work)
    model_dir = Path(args.model_dir)
    from transformers import AutoTokenizer

    rows = make_texts(AutoTokenizer.from_pretrained(model_dir), args.batch_size * args.steps, args.seq_len)
    result = (run_ours if args.only == "ours" else run_trl)(args, model_dir, rows, work / args.only)
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="default: 12 (cpu), 20 (cuda)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 8 (cpu), 16 (cuda)")
    parser.add_argument("--seq-len", type=int, default=None, help="default: 128 (cpu), 256 (cuda)")
    parser.add_argument("--hidden", type=int, default=64, help="tiny model width (cpu)")
    parser.add_argument("--layers", type=int, default=2, help="tiny model depth (cpu)")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--lora", action="store_true", help="LoRA on both instead of full fine-tuning")
    parser.add_argument("--only", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cpu = args.device == "cpu"
    args.steps = args.steps or (12 if cpu else 20)
    args.batch_size = args.batch_size or (8 if cpu else 16)
    args.seq_len = args.seq_len or (128 if cpu else 256)
    if args.only:
        return child(args)

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        model_dir = build_model(args, work)
        results = {}
        for name in ("ours", "trl"):
            (work / name).mkdir()
            cmd = [sys.executable, __file__, "--only", name, "--work", str(work), "--model-dir", str(model_dir),
                   "--device", args.device, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--seq-len", str(args.seq_len), "--lr", str(args.lr)] + (["--lora"] if args.lora else [])
            done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
            lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"{name} failed:\n{done.stderr[-4000:]}")
            results[name] = json.loads(lines[-1][len("RESULT "):])

    what = f"{args.device}, {'LoRA' if args.lora else 'full FT'}, batch {args.batch_size}, {args.seq_len} tokens, " \
           f"{args.steps} steps" + (f", tiny Llama {args.layers}x{args.hidden}" if cpu else ", SmolLM2-135M")
    mem = "peak RSS GiB" if cpu else "peak CUDA GiB"
    print(f"\nKTO training benchmark ({what})")
    print(f"{'trainer':<8} {'steady samples/s':>17} {'end-to-end samples/s':>21} {mem:>14} {'first loss':>11}")
    for name, r in results.items():
        print(f"{name:<8} {r['steady']:>17.1f} {r['end_to_end']:>21.1f} {r['peak_gib']:>14.2f} {r['first_loss']:>11.4f}")
    ours, trl = results["ours"], results["trl"]
    print(f"ratio ours/TRL: steady {ours['steady'] / trl['steady']:.2f}x, end-to-end "
          f"{ours['end_to_end'] / trl['end_to_end']:.2f}x, memory {ours['peak_gib'] / trl['peak_gib']:.2f}x")


if __name__ == "__main__":
    main()
