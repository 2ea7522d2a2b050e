"""One trainer for every preference loss: LoRA (or full fine-tuning), cached reference log-probs, resumable.

Public functions (the flows call these; the CLI is a thin layer over them):

    train(config, snapshot, reference, out_dir, *, decision=None, cache_dir=None, resume=False) -> RunResult
        Trains ``config.method`` on ``snapshot``'s train split, if ``decision`` (the recorded decision about
        the snapshot; None: the default rules decide) allows it, and writes to ``out_dir``: a peft adapter
        (``PeftModel.from_pretrained(base, out_dir)``; full fine-tuning writes a whole HF model instead),
        ``training_meta.json`` (resolved config, snapshot and reference hashes, metrics, held-out score) and
        ``metrics.jsonl`` (one line per optimizer step). Refuses a reference whose files changed or whose
        model_version differs from the snapshot's. Under torchrun every rank calls it; rank 0 writes.
    train_sweep(config, snapshot, reference, out_dir, betas, *, decision=None, cache_dir=None, resume=False)
        One run per beta under ``out_dir/beta-<b>/``, each scored on the eval split; the best is copied to
        ``out_dir`` and every score is recorded in its metadata under "sweep".
    evaluate_preference(model, tokenizer, snapshot, reference, config, *, cache_dir, split="eval")
        -> PreferenceScore   (in training.evaluate: held-out loss and reward accuracy)

The step (``train_step``) is one forward+backward per micro-batch, plus one no-grad forward for KTO's z. The
reference's log-probs come from the same forwards when LoRA leaves a shared trunk (the layers above it run
again with the adapter disabled), else from the cache filled before the first step (``training.logprobs``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ktoloop.errors import KtoLoopError
from ktoloop.methods import METHODS, Method
from ktoloop.snapshot import Snapshot
from training.config import TrainConfig
from training.data import Encoded, encode_snapshot, collate, mismatched
from training.evaluate import evaluate_preference, fill_reference, heldout_method, reference_cache
from training.logprobs import (ReferenceCache, autocast, frozen_reference, policy_and_reference_logps,
                               sequence_logps, shared_trunk)
from training.losses import BatchInfo
from training.reference import Reference
from training.runs import (META_FILE, RunResult, append_metrics, finished_run, last_metrics, load_checkpoint,
                           run_meta, save_checkpoint, truncate_metrics, write_meta)
from training.runtime import check_decision, make_trainable, process_rank, save_model, setup_processes, warmup_cosine

log = logging.getLogger(__name__)

GROUP_WINDOW = 16
"""``group_by_length``: global micro-batches per window sorted by length (larger: less padding, less mixing)."""


@dataclass
class Context:
    """Where and how this process trains: the pieces the step needs besides the model and the data."""

    device: torch.device
    rank: int
    world: int
    pad_id: int
    examples_per_step: int  # global: batch_size x grad_accumulation_steps x world
    weights: dict[str, float]
    shared_layers: int = 0
    """``training.logprobs.shared_trunk``: > 0, the step computes the reference's log-probs itself."""


# ----------------------------------------------------------------------------------------------- the step

def train_step(model, optimizer, scheduler, micro_batches, data: Encoded, ref: ReferenceCache, method: Method,
               config: TrainConfig, ctx: Context) -> dict:
    """One optimizer step over ``grad_accumulation_steps`` micro-batches; returns globally-averaged metrics."""
    model.train()
    stats = torch.zeros(9, dtype=torch.float64)
    for rows, kl_pairs in micro_batches:
        pairs = data.sequences(rows)
        batch = collate(data, pairs, ctx.pad_id, ctx.device)
        info = BatchInfo(lengths=batch.lengths, desirable_weight=ctx.weights["desirable"],
                         undesirable_weight=ctx.weights["undesirable"])
        if data.desirable:
            info.desirable = torch.tensor([data.desirable[r] for r in rows], device=ctx.device)
        with autocast(ctx.device):
            policy, reference = _logps(model, batch, data, pairs, ref, ctx)
            if method.uses_kl:
                with torch.no_grad():
                    kl_batch = collate(data, kl_pairs, ctx.pad_id, ctx.device)
                    info.kl_policy_logps, info.kl_reference_logps = _logps(model, kl_batch, data, kl_pairs, ref, ctx)
        out = method.loss(policy, reference, info, config.beta)
        (out.losses.sum() / ctx.examples_per_step).backward()
        stats += torch.tensor([out.losses.sum().item(), len(out.losses),
                               out.chosen_rewards.sum().item(), len(out.chosen_rewards),
                               out.rejected_rewards.sum().item(), len(out.rejected_rewards),
                               out.correct.sum().item(), out.metrics.get("kl", 0.0), 1.0], dtype=torch.float64)
    _sum_gradients(model, ctx.world)
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                               config.max_grad_norm or float("inf"))
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return _step_metrics(stats, ctx, grad_norm, lr)


def _logps(model, batch, data: Encoded, pairs, ref: ReferenceCache, ctx: Context):
    """(policy, reference) log-probs of a batch: both from one trunk pass when LoRA leaves one, else the
    reference's from the cache."""
    if ctx.shared_layers:
        return policy_and_reference_logps(model, batch, ctx.shared_layers)
    return sequence_logps(model, batch), ref.get(data, pairs, ctx.device)


# ------------------------------------------------------------------------------------------------ the run

def train(config: TrainConfig, snapshot: Snapshot, reference: Reference, out_dir: str | Path, *,
          decision=None, cache_dir: str | Path | None = None, resume: bool = False,
          override: str | None = None) -> RunResult:
    """Train one model; see the module docstring. Returns the metadata also written to training_meta.json.
    ``decision``: the recorded decision about the snapshot (None: decide under the default rules);
    ``override``: the reason to train although it refuses this run (``check_decision``)."""
    out_dir = Path(out_dir)
    overridden = check_decision(snapshot, config.method, decision, override)
    if (meta := finished_run(out_dir, resume)) is not None:
        return RunResult(out_dir, meta)
    reference.check_version(snapshot.manifest.model_version)
    reference.verify()
    method = METHODS[config.method]
    device, rank, world = setup_processes(config)
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    started = time.time()

    from training.modeling import load_model  # heavy imports stay out of `ktoloop --help`

    torch.manual_seed(config.seed)
    model, tokenizer = load_model(reference.path, device=device)
    data = encode_snapshot(snapshot, "train", tokenizer, method.paired, config.max_length, config.max_prompt_length)
    plan = _plan(data.n, config, world, method.uses_kl, example_lengths(data) if config.group_by_length else None,
                 data.desirable or None)
    weights = {k: float((snapshot.manifest.kto_weights or {}).get(k, 1.0)) for k in ("desirable", "undesirable")}
    model = make_trainable(model, config)
    ctx = Context(device, rank, world, tokenizer.pad_token_id,
                  config.batch_size * config.grad_accumulation_steps * world, weights, shared_trunk(model))

    # Without a shared trunk: the reference's log-probs of every sequence the run (and its held-out scoring)
    # will see, before any update. With one, the steps and the held-out scoring compute their own.
    has_eval = heldout_method(snapshot, config.method) is not None
    ref = reference_cache(reference, device, cache_dir)
    if rank == 0 and not ctx.shared_layers:
        with frozen_reference(model):
            ref.fill(model, data, plan.all_pairs(data), ctx.pad_id, device, max(config.batch_size, 8))
            if has_eval:
                fill_reference(model, tokenizer, snapshot, reference, config, "eval", cache_dir)
    if world > 1:
        dist.barrier()
        ref = reference_cache(reference, device, cache_dir)  # re-read rank 0's file
    if ctx.shared_layers:
        log.info("reference log-probs: computed in each step from the policy's first %d layers (shared trunk)",
                 ctx.shared_layers)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, plan.total_steps))
    torch.manual_seed(config.seed + rank)  # dropout streams; the LoRA init above is identical on every rank
    saved = load_checkpoint(out_dir, model, config, "training", optimizer=optimizer, scheduler=scheduler) \
        if resume else None
    start = int(saved["step"]) if saved else 0
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        truncate_metrics(out_dir, start)

    for step in range(start, plan.total_steps):
        t0 = time.perf_counter()
        metrics = train_step(model, optimizer, scheduler, plan.step(step, rank), data, ref, method, config, ctx)
        metrics.update(step=step + 1, epoch=plan.epoch(step), seconds=round(time.perf_counter() - t0, 4))
        if rank == 0:
            append_metrics(out_dir, metrics)
            if (step + 1) % max(1, plan.total_steps // 10) == 0 or step + 1 == plan.total_steps:
                log.info("step %d/%d: loss %.4f (%.2f s/step)", step + 1, plan.total_steps,
                         metrics.get("loss", float("nan")), metrics["seconds"])
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 and step + 1 < plan.total_steps:
            save_checkpoint(out_dir, step + 1, model, config, rank=rank, optimizer=optimizer, scheduler=scheduler)

    score = None
    if has_eval:
        score = evaluate_preference(model, tokenizer, snapshot, reference, config, cache_dir=cache_dir)
    meta = run_meta(config, snapshot, reference, started, steps=plan.total_steps, examples=plan.n, processes=world,
                    final_train_metrics=last_metrics(out_dir), eval=dataclasses.asdict(score) if score else None,
                    reference_logps={"shared_layers": ctx.shared_layers, "source": "step" if ctx.shared_layers
                                     else "cache"},
                    **({"override": overridden} if overridden else {}))
    if rank == 0:
        save_model(model, tokenizer, config, out_dir)
        write_meta(out_dir, meta)
    if world > 1:
        dist.barrier()
    return RunResult(out_dir, meta)


def train_sweep(config: TrainConfig, snapshot: Snapshot, reference: Reference, out_dir: str | Path,
                betas: list[float], *, decision=None, cache_dir: str | Path | None = None,
                resume: bool = False, override: str | None = None) -> RunResult:
    """Train one run per beta, keep the best held-out reward accuracy (ties: lower held-out loss), record all."""
    out_dir = Path(out_dir)
    if not betas:
        raise KtoLoopError("--sweep-beta lists no beta")
    if heldout_method(snapshot, config.method) is None:
        raise KtoLoopError(f"snapshot {snapshot.manifest.snapshot_id} has no eval split to choose a beta with")
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    runs = []
    for beta in betas:
        result = train(dataclasses.replace(config, beta=beta), snapshot, reference, out_dir / f"beta-{beta:g}",
                       decision=decision, cache_dir=cache_dir, resume=resume, override=override)
        runs.append({"beta": beta, "dir": str(result.out_dir), "eval": result.eval})
    best = max(runs, key=lambda r: (r["eval"]["accuracy"], -r["eval"]["loss"]))
    meta = json.loads((Path(best["dir"]) / META_FILE).read_text())
    meta.update(sweep=runs, best_beta=best["beta"])
    if process_rank() == 0:
        for file in Path(best["dir"]).iterdir():
            if file.is_file() and file.name != META_FILE:
                shutil.copy2(file, out_dir / file.name)
        write_meta(out_dir, meta)
    return RunResult(out_dir, meta)


# ------------------------------------------------------------------------------------------------ helpers

@dataclass
class Plan:
    """Which examples each process sees at each step: a fresh seeded permutation per epoch, global
    micro-batches cut from it, each process taking its slice; KTO's mismatched pairs are cut from the
    *global* micro-batch, so z is the same with 1 or N processes."""

    n: int
    config: TrainConfig
    world: int
    uses_kl: bool
    steps_per_epoch: int
    total_steps: int
    lengths: list[int] | None = None
    """Tokens per example (the longer sequence of a pair), when ``config.group_by_length``."""
    labels: list[bool] | None = None
    """KTO with ``group_by_length``: each example's label, so grouping keeps every batch's label mix."""
    _orders: dict[int, list[int]] = field(default_factory=dict, repr=False, compare=False)
    """Each epoch's order, computed once: every step (and ``all_pairs``, over every step) asks for it."""

    def epoch(self, step: int) -> int:
        return step // self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """The epoch's seeded permutation; with lengths, regrouped window by window (``_grouped``) and cut
        into micro-batches, whose order is then shuffled."""
        if epoch not in self._orders:
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch]

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is None:
            return order
        size = self.config.batch_size * self.world
        window = size * GROUP_WINDOW
        grouped = [r for i in range(0, self.n, window) for r in self._grouped(order[i: i + window], size)]
        full = len(grouped) // size
        blocks = [grouped[b * size: (b + 1) * size] for b in torch.randperm(full, generator=generator).tolist()]
        return [r for block in blocks for r in block] + grouped[full * size:]

    def _grouped(self, rows: list[int], size: int) -> list[int]:
        """One window of ``GROUP_WINDOW`` batches, laid out so consecutive ``size`` rows have similar lengths.

        With labels, each batch takes its quantile slice of every label's length-sorted rows, so it keeps the
        window's share of thumbs up: sorting by length alone would make batches of one label wherever length
        predicts the label (short answers liked), and KTO on one-label batches pushes every answer the same
        way (measured: held-out liked answers' log-ratios fell with the disliked ones)."""
        key = self.lengths.__getitem__
        if self.labels is None:
            return sorted(rows, key=key)
        batches = max(1, len(rows) // size)
        dealt: list[list[int]] = [[] for _ in range(batches)]
        for label in (True, False):
            members = sorted((r for r in rows if self.labels[r] == label), key=key)
            for b in range(batches):
                dealt[b] += members[b * len(members) // batches: (b + 1) * len(members) // batches]
        return [r for batch in dealt for r in batch]

    def global_micro_batches(self, step: int) -> list[list[int]]:
        size = self.config.batch_size * self.world
        order, first = self.order(self.epoch(step)), (step % self.steps_per_epoch) * self.config.grad_accumulation_steps
        return [order[(first + k) * size: (first + k + 1) * size] for k in range(self.config.grad_accumulation_steps)]

    def step(self, step: int, rank: int) -> list[tuple[list[int], list]]:
        lo, hi = rank * self.config.batch_size, (rank + 1) * self.config.batch_size
        return [(rows[lo:hi], self.kl_pairs(rows, rank)) for rows in self.global_micro_batches(step)]

    def kl_pairs(self, rows: list[int], rank: int) -> list:
        """This process's mismatched pairs of a global micro-batch: its slice, the first ``config.kl_pairs``."""
        if not self.uses_kl:
            return []
        lo = rank * self.config.batch_size
        return mismatched(rows)[lo: lo + (self.config.kl_pairs or self.config.batch_size)]

    def all_pairs(self, data: Encoded) -> list:
        """Every sequence the run will score: only the rows its steps visit (a bounded run pays for those)."""
        visited = sorted({r for step in range(self.total_steps) for rows in self.global_micro_batches(step)
                          for r in rows})
        pairs = data.sequences(visited)
        if self.uses_kl:
            for step in range(self.total_steps):
                for rows in self.global_micro_batches(step):
                    pairs += [p for rank in range(self.world) for p in self.kl_pairs(rows, rank)]
        return pairs


def _plan(n: int, config: TrainConfig, world: int, uses_kl: bool, lengths: list[int] | None = None,
          labels: list[bool] | None = None) -> Plan:
    global_batch = config.batch_size * config.grad_accumulation_steps * world
    if uses_kl and config.batch_size * world < 2:
        raise KtoLoopError("training.batch_size x processes must be >= 2 for KTO: z needs mismatched pairs")
    steps_per_epoch = n // global_batch
    if steps_per_epoch == 0:
        raise KtoLoopError(f"the train split has {n} examples, fewer than one global batch ({global_batch} = "
                           f"training.batch_size x grad_accumulation_steps x {world} processes)")
    total = config.max_steps or config.epochs * steps_per_epoch
    grouped = config.group_by_length and lengths is not None
    return Plan(n, config, world, uses_kl, steps_per_epoch, total, lengths if grouped else None,
                labels if grouped and labels else None)


def example_lengths(data: Encoded) -> list[int]:
    """Tokens of each example as trained (truncated): a pair counts its longer sequence."""
    return [max(sum(map(len, data.tokens(p))) for p in data.sequences([row])) for row in range(data.n)]


def _sum_gradients(model, world: int) -> None:
    """Each rank's loss is already divided by the global batch, so summing gradients gives the global mean."""
    if world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def _step_metrics(stats: torch.Tensor, ctx: Context, grad_norm: torch.Tensor, lr: float) -> dict:
    if ctx.world > 1:
        stats = stats.to(ctx.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(stats)
    loss, n, chosen, n_chosen, rejected, n_rejected, correct, kl, micro = stats.tolist()
    chosen_mean = chosen / n_chosen if n_chosen else float("nan")
    rejected_mean = rejected / n_rejected if n_rejected else float("nan")
    return {"loss": loss / n, "rewards/chosen": chosen_mean, "rewards/rejected": rejected_mean,
            "rewards/margin": chosen_mean - rejected_mean, "rewards/accuracy": correct / n, "kl": kl / micro,
            "grad_norm": float(grad_norm), "lr": lr}
