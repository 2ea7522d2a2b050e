"""Held-out preference scoring: the training loss and reward accuracy of a model on a snapshot split.

    evaluate_preference(model, tokenizer, snapshot, reference, config, *, cache_dir, split="eval")
        -> PreferenceScore      (cache_dir: the reference log-prob cache, <home>/cache in the CLI)

``model`` is the policy (a PeftModel, or a merged model from ``training.modeling.load_model``), already on its
device. Reference log-probs come from the on-disk cache, computed with the pinned reference on a miss.

Reward accuracy: pairs (DPO/IPO): fraction of pairs whose chosen implicit reward exceeds the rejected one.
KTO: fraction of completions on the right side of the KL baseline z (desirable: log-ratio > z, undesirable:
log-ratio < z), z being the clamped mean log-ratio of the split's mismatched (prompt_i, completion_i+1) pairs.
Under torch.distributed every rank must call it (z is all-reduced); they all get the same score.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ktoloop.snapshot import Snapshot
from training.config import TrainConfig
from training.data import Encoded, Pair, encode_snapshot, mismatched
from training.logprobs import ReferenceCache, compute_logps
from training.losses import LOSSES, BatchInfo
from training.reference import Reference


@dataclass(frozen=True)
class PreferenceScore:
    split: str
    method: str
    beta: float
    examples: int
    loss: float
    """Mean held-out loss of ``method`` at ``beta`` (comparable across models, not across betas)."""
    accuracy: float
    """Reward accuracy, see the module docstring (comparable across betas)."""
    reward_chosen: float
    """Mean implicit reward (beta x log-ratio) of desirable / chosen completions."""
    reward_rejected: float
    reward_margin: float
    kl: float | None
    """KTO's z on this split."""


def has_split(snapshot: Snapshot, paired: bool, split: str) -> bool:
    return snapshot.rows("pairs" if paired else "kto", split) > 0


def split_pairs(data: Encoded, uses_kl: bool) -> tuple[list[Pair], list[Pair]]:
    """The scored sequences of a whole split, and (KTO) its mismatched pairs."""
    rows = list(range(data.n))
    return data.sequences(rows), (mismatched(rows) if uses_kl else [])


def reference_cache(reference: Reference, device: torch.device, cache_dir: str | Path) -> ReferenceCache:
    return ReferenceCache.for_reference(Path(cache_dir), reference.sha256, device)


def fill_reference(ref_model, tokenizer, snapshot: Snapshot, reference: Reference, config: TrainConfig,
                   split: str, cache_dir: str | Path) -> ReferenceCache:
    """Cache the reference log-probs a later ``evaluate_preference`` on ``split`` needs."""
    method = LOSSES[config.method]
    device = next(ref_model.parameters()).device
    data = encode_snapshot(snapshot, split, tokenizer, method.paired, config.max_length, config.max_prompt_length)
    cache = reference_cache(reference, device, cache_dir)
    pairs, kl_pairs = split_pairs(data, method.uses_kl)
    cache.fill(ref_model, data, pairs + kl_pairs, _pad(tokenizer), device, max(config.batch_size, 8))
    return cache


@torch.no_grad()
def evaluate_preference(model, tokenizer, snapshot: Snapshot, reference: Reference, config: TrainConfig, *,
                        cache_dir: str | Path, split: str = "eval") -> PreferenceScore:
    """Score ``model`` on ``split`` with ``config.method`` and ``config.beta``; see the module docstring."""
    method = LOSSES[config.method]
    device = next(model.parameters()).device
    data = encode_snapshot(snapshot, split, tokenizer, method.paired, config.max_length, config.max_prompt_length)
    pairs, kl_pairs = split_pairs(data, method.uses_kl)
    cache = reference_cache(reference, device, cache_dir)
    if cache.missing(data, pairs + kl_pairs):
        from training.modeling import load_model

        ref_model, _ = load_model(reference.path, device=device)
        cache.fill(ref_model, data, pairs + kl_pairs, _pad(tokenizer), device, max(config.batch_size, 8))
        del ref_model
    policy = compute_logps(model, data, pairs + kl_pairs, _pad(tokenizer), device, max(config.batch_size, 8))
    policy = policy.to(device)  # the loss may all-reduce (KTO's z), and NCCL needs device tensors
    lengths = torch.tensor([len(data.tokens(p)[1]) for p in pairs], dtype=torch.float32, device=device)
    info = BatchInfo(lengths=lengths, kl_policy_logps=policy[len(pairs):],
                     kl_reference_logps=cache.get(data, kl_pairs, device),
                     desirable=torch.tensor(data.desirable, device=device) if data.desirable else None,
                     desirable_weight=float((snapshot.manifest.kto_weights or {}).get("desirable", 1.0)),
                     undesirable_weight=float((snapshot.manifest.kto_weights or {}).get("undesirable", 1.0)))
    out = method.loss(policy[: len(pairs)], cache.get(data, pairs, device), info, config.beta)
    chosen, rejected = out.chosen_rewards.mean().item(), out.rejected_rewards.mean().item()
    return PreferenceScore(split=split, method=config.method, beta=config.beta, examples=data.n,
                           loss=out.losses.mean().item(), accuracy=out.correct.float().mean().item(),
                           reward_chosen=chosen, reward_rejected=rejected, reward_margin=chosen - rejected,
                           kl=out.metrics.get("kl"))


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
