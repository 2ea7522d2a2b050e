"""Preference losses: one signature, one small pure function per offline method, ``<name>_loss`` for each
offline entry of ``ktoloop.methods.METHODS`` (which says what each trains on and whether it needs KTO's z).

Every loss takes summed completion log-probs of the policy and of the reference (one per sequence, in the
order ``Encoded.sequences`` gives: paired methods put all chosen first, then all rejected) plus ``BatchInfo``,
and returns per-example losses, implicit rewards (beta-scaled log-ratios) and a per-example ``correct`` flag
(ranked the preference right) used for held-out reward accuracy. The trainer never branches on the name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F


@dataclass
class BatchInfo:
    lengths: torch.Tensor
    """Completion tokens per sequence (for length-normalised losses)."""
    desirable: torch.Tensor | None = None
    """KTO: bool label per sequence."""
    kl_policy_logps: torch.Tensor | None = None
    """KTO: policy log-probs of the mismatched (prompt_i, completion_i+1) sequences, computed without grad."""
    kl_reference_logps: torch.Tensor | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0


@dataclass
class LossOutput:
    losses: torch.Tensor
    """One per example (KTO: per completion; DPO/IPO: per pair); the trainer averages over the global batch."""
    chosen_rewards: torch.Tensor
    """Desirable (KTO) or chosen (pairs) implicit rewards, detached."""
    rejected_rewards: torch.Tensor
    correct: torch.Tensor
    """Per example: did the implicit reward rank it right (pairs: chosen > rejected; KTO: desirable above
    the KL baseline z, undesirable below it)."""
    metrics: dict[str, float] = field(default_factory=dict)


LossFn = Callable[[torch.Tensor, torch.Tensor, BatchInfo, float], LossOutput]


def kto_loss(policy: torch.Tensor, reference: torch.Tensor, info: BatchInfo, beta: float) -> LossOutput:
    """KTO (Ethayarajh et al. 2024): value of each completion's log-ratio against the batch's KL baseline z."""
    logratio = policy - reference
    z = _global_mean((info.kl_policy_logps - info.kl_reference_logps).detach()).clamp(min=0)
    good = info.desirable
    losses = torch.where(good,
                         info.desirable_weight * (1 - torch.sigmoid(beta * (logratio - z))),
                         info.undesirable_weight * (1 - torch.sigmoid(beta * (z - logratio))))
    rewards = beta * logratio.detach()
    correct = torch.where(good, logratio.detach() > z, logratio.detach() < z)
    return LossOutput(losses, rewards[good], rewards[~good], correct, {"kl": float(z)})


def dpo_loss(policy: torch.Tensor, reference: torch.Tensor, info: BatchInfo, beta: float) -> LossOutput:
    """DPO (Rafailov et al. 2023): logistic loss on the difference of summed log-ratios."""
    chosen, rejected = (policy - reference).chunk(2)
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), (chosen > rejected).detach())


def ipo_loss(policy: torch.Tensor, reference: torch.Tensor, info: BatchInfo, beta: float) -> LossOutput:
    """IPO (Azar et al. 2023): squared distance of the length-averaged log-ratio margin from 1/(2 beta)."""
    chosen, rejected = ((policy - reference) / info.lengths).chunk(2)
    losses = (chosen - rejected - 1 / (2 * beta)) ** 2
    return LossOutput(losses, beta * chosen.detach(), beta * rejected.detach(), (chosen > rejected).detach())


def _global_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over every process's values, so z is the same on all ranks as on one process."""
    total = torch.stack([values.sum(), torch.tensor(float(values.numel()), device=values.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return total[0] / total[1]
