"""Held-out preference scoring: per-example scores, loss and reward accuracy of a model on a snapshot split.

    evaluate_preference(model, tokenizer, snapshot, reference, config, *, cache_dir, split="eval")
        -> PreferenceScore      (cache_dir: the reference log-prob cache, <home>/cache in the CLI)

``model`` is the policy (a PeftModel, or a merged model from ``training.modeling.load_model``), already on its
device. Reference log-probs come from the on-disk cache; on a miss, from the policy's own forward when it shares
a trunk with the reference (``training.logprobs.shared_trunk``), else from the pinned reference loaded for it.

Every model scored on one snapshot is scored in the same form (``heldout_method``), so the promotion gate
can compare them example by example: on the held-out same-prompt pairs when there are any (whether a pair's
implicit rewards rank the human choice right means the same for KTO, DPO, IPO and PPO candidates), else on
the held-out thumbs. Per-example score: 1 when ranked right, 0 when wrong, 1/2 for a tie, so the reference
itself (log-ratio 0 everywhere) scores exactly 1/2.
  pairs:  right when the chosen completion's summed log-ratio exceeds the rejected one's;
  thumbs: right when a desirable completion's log-ratio is above KTO's KL baseline z and an undesirable one's
          below it, z being the clamped mean log-ratio of the split's mismatched (prompt_i, completion_i+1).
Under torch.distributed every rank must call it (z is all-reduced); they all get the same score.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ktoloop.snapshot import Snapshot
from training.config import TrainConfig
from training.data import Encoded, Pair, encode_snapshot, mismatched
from training.logprobs import ReferenceCache, compute_logps, compute_policy_and_reference, shared_trunk
from ktoloop.methods import METHODS
from training.losses import BatchInfo
from training.reference import Reference


@dataclass(frozen=True)
class PreferenceScore:
    split: str
    method: str
    """The loss the split was scored with (``heldout_method``)."""
    beta: float
    examples: int
    loss: float
    """Mean held-out loss of ``method`` at ``beta`` (comparable across models, not across betas)."""
    accuracy: float
    """Mean of ``scores`` (comparable across betas and methods)."""
    reward_chosen: float
    """Mean implicit reward (beta x log-ratio) of desirable / chosen completions."""
    reward_rejected: float
    reward_margin: float
    kl: float | None
    """KTO's z on this split."""
    form: str = "pairs"
    """"pairs" (held-out same-prompt pairs) or "thumbs" (held-out thumbs up/down)."""
    scores: list[float] = dataclasses.field(default_factory=list)
    """Per example, in the snapshot's canonical order: 1 ranked right, 0 wrong, 0.5 tie."""


def has_split(snapshot: Snapshot, paired: bool, split: str) -> bool:
    return snapshot.rows("pairs" if paired else "kto", split) > 0


def heldout_method(snapshot: Snapshot, method: str, split: str = "eval") -> str | None:
    """The loss every candidate of ``snapshot`` is scored with on ``split``: the method's own when it is paired,
    DPO's for the others, on the split's pairs; KTO's on its thumbs when it has no pairs; None when empty."""
    if has_split(snapshot, True, split):
        return method if method in METHODS and METHODS[method].paired else "dpo"
    if has_split(snapshot, False, split):
        return "kto"
    return None


def split_pairs(data: Encoded, uses_kl: bool) -> tuple[list[Pair], list[Pair]]:
    """The scored sequences of a whole split, and (KTO) its mismatched pairs."""
    rows = list(range(data.n))
    return data.sequences(rows), (mismatched(rows) if uses_kl else [])


def reference_cache(reference: Reference, device: torch.device, cache_dir: str | Path) -> ReferenceCache:
    return ReferenceCache.for_reference(Path(cache_dir), reference.sha256, device)


def _encode(snapshot: Snapshot, split: str, tokenizer, config: TrainConfig):
    name = heldout_method(snapshot, config.method, split)
    method = METHODS[name]
    data = encode_snapshot(snapshot, split, tokenizer, method.paired, config.max_length, config.max_prompt_length)
    return name, method, data, *split_pairs(data, method.uses_kl)


def fill_reference(ref_model, tokenizer, snapshot: Snapshot, reference: Reference, config: TrainConfig,
                   split: str, cache_dir: str | Path) -> ReferenceCache:
    """Cache the reference log-probs a later ``evaluate_preference`` on ``split`` needs."""
    device = next(ref_model.parameters()).device
    _, _, data, pairs, kl_pairs = _encode(snapshot, split, tokenizer, config)
    cache = reference_cache(reference, device, cache_dir)
    cache.fill(ref_model, data, pairs + kl_pairs, _pad(tokenizer), device, max(config.batch_size, 8))
    return cache


@torch.no_grad()
def evaluate_preference(model, tokenizer, snapshot: Snapshot, reference: Reference, config: TrainConfig, *,
                        cache_dir: str | Path, split: str = "eval") -> PreferenceScore:
    """Score ``model`` on ``split`` at ``config.beta``; see the module docstring."""
    name, method, data, pairs, kl_pairs = _encode(snapshot, split, tokenizer, config)
    device = next(model.parameters()).device
    cache = reference_cache(reference, device, cache_dir)
    scored, batch, label = pairs + kl_pairs, max(config.batch_size, 8), f"held-out scoring ({split})"
    missing, shared = bool(cache.missing(data, scored)), shared_trunk(model)
    if missing and shared:
        policy, reference_logps = compute_policy_and_reference(model, data, scored, _pad(tokenizer), device, batch,
                                                               shared, label)
        cache.add(data, scored, reference_logps)
    else:
        if missing:
            from training.modeling import load_model

            ref_model, _ = load_model(reference.path, device=device)
            cache.fill(ref_model, data, scored, _pad(tokenizer), device, batch)
            del ref_model
        policy = compute_logps(model, data, scored, _pad(tokenizer), device, batch, label)
    policy = policy.to(device)  # the loss may all-reduce (KTO's z), and NCCL needs device tensors
    ref = cache.get(data, pairs, device)
    lengths = torch.tensor([len(data.tokens(p)[1]) for p in pairs], dtype=torch.float32, device=device)
    weights = snapshot.manifest.kto_weights or {}
    info = BatchInfo(lengths=lengths, kl_policy_logps=policy[len(pairs):],
                     kl_reference_logps=cache.get(data, kl_pairs, device),
                     desirable=torch.tensor(data.desirable, device=device) if data.desirable else None,
                     desirable_weight=float(weights.get("desirable", 1.0)),
                     undesirable_weight=float(weights.get("undesirable", 1.0)))
    out = method.loss(policy[: len(pairs)], ref, info, config.beta)
    scores = ranking_scores(policy[: len(pairs)] - ref, info, method.paired, out.metrics.get("kl", 0.0))
    chosen, rejected = out.chosen_rewards.mean().item(), out.rejected_rewards.mean().item()
    return PreferenceScore(split=split, method=name, beta=config.beta, examples=data.n,
                           loss=out.losses.mean().item(), accuracy=sum(scores) / len(scores),
                           reward_chosen=chosen, reward_rejected=rejected, reward_margin=chosen - rejected,
                           kl=out.metrics.get("kl"), form="pairs" if method.paired else "thumbs", scores=scores)


def ranking_scores(logratio: torch.Tensor, info: BatchInfo, paired: bool, z: float) -> list[float]:
    """Per example 1 / 0 / 0.5: ranked right, wrong, tied (see the module docstring)."""
    if paired:
        chosen, rejected = logratio.chunk(2)
        margin = chosen - rejected
    else:
        margin = torch.where(info.desirable, logratio - z, z - logratio)
    return ((margin > 0).double() + 0.5 * (margin == 0).double()).tolist()


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def reference_score(snapshot: Snapshot, config: TrainConfig, split: str = "eval") -> PreferenceScore:
    """The reference scored as a policy, in closed form: its log-ratio to itself is 0 for every completion, so
    every example ties (score 1/2) and the loss is the method's loss at 0. Running the model would only add
    floating-point noise around these values, and minutes of CPU."""
    name = heldout_method(snapshot, config.method, split)
    method = METHODS[name]
    if method.paired:
        n = snapshot.pairs(split).height
        info = BatchInfo(lengths=torch.ones(2 * n))
        zeros = torch.zeros(2 * n)
    else:
        labels = snapshot.kto(split)["label"].to_list()
        n = len(labels)
        weights = snapshot.manifest.kto_weights or {}
        info = BatchInfo(lengths=torch.ones(n), desirable=torch.tensor(labels, dtype=torch.bool),
                         kl_policy_logps=torch.zeros(n), kl_reference_logps=torch.zeros(n),
                         desirable_weight=float(weights.get("desirable", 1.0)),
                         undesirable_weight=float(weights.get("undesirable", 1.0)))
        zeros = torch.zeros(n)
    out = method.loss(zeros, zeros, info, config.beta)
    return PreferenceScore(split=split, method=name, beta=config.beta, examples=n, loss=out.losses.mean().item(),
                           accuracy=0.5, reward_chosen=0.0, reward_rejected=0.0, reward_margin=0.0, kl=0.0,
                           form="pairs" if method.paired else "thumbs", scores=[0.5] * n)
