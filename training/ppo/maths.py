"""PPO's maths, pure tensor functions: KL-penalised per-token rewards, GAE, and the clipped losses."""

from __future__ import annotations

import torch

from training.config import PPOConfig


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def kl_penalised_rewards(scores: torch.Tensor, logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor,
                         kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards ``-kl_coef * (log pi - log ref)``, plus the score on each sequence's last token."""
    kl = (logps - ref_logps) * mask
    rewards = -kl_coef * kl
    last = mask.long().sum(1).clamp(min=1) - 1
    rewards[torch.arange(len(rewards), device=rewards.device), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation; positions past the end are masked, so the episode ends there."""
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(len(rewards), device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_loss(logps, values, old_logps, old_values, advantages, returns, mask,
             config: PPOConfig) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate + vf_coef x clipped value loss, token-averaged over the completions."""
    ratio = torch.exp(logps - old_logps)
    clipped_ratio = ratio.clamp(1 - config.clip_range, 1 + config.clip_range)
    policy_loss = masked_mean(torch.max(-advantages * ratio, -advantages * clipped_ratio), mask)
    clipped_values = old_values + (values - old_values).clamp(-config.clip_range_value, config.clip_range_value)
    value_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped_values - returns) ** 2), mask)
    stats = {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
             "clipfrac": masked_mean(((ratio - 1).abs() > config.clip_range).float(), mask).item(),
             "approx_kl": masked_mean(0.5 * (logps - old_logps) ** 2, mask).item()}
    return policy_loss + config.vf_coef * value_loss, stats
