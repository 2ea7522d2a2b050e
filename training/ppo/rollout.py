"""PPO's rollouts: sample completions from the policy, score them, and compute everything the update needs
(old log-probs, values, the reference's log-probs, KL-penalised rewards, advantages) before any update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot
from training.config import PPOConfig
from training.data import render_prompt
from training.evaluate import has_split
from training.logprobs import decoder_states
from training.ppo.maths import gae, kl_penalised_rewards, whiten

RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""(prompt token ids, completion token ids) -> one score per completion. Completions end at (and include) the
end-of-turn token when the policy produced one."""


@dataclass
class Rollout:
    """Left-padded prompts followed by completions; ``mask`` marks completion tokens up to the first end-of-turn."""

    input_ids: torch.Tensor       # (B, P + T)
    attention_mask: torch.Tensor  # (B, P + T)
    prompt_width: int             # P
    mask: torch.Tensor            # (B, T) float
    prompts: list[list[int]]
    completions: list[list[int]]

    @property
    def completion_ids(self) -> torch.Tensor:
        return self.input_ids[:, self.prompt_width:]

    @property
    def position_ids(self) -> torch.Tensor:
        """As generation saw them: left padding does not shift positions."""
        return (self.attention_mask.long().cumsum(-1) - 1).clamp(min=0)

    def select(self, rows: torch.Tensor) -> "Rollout":
        picked = rows.tolist()
        return Rollout(self.input_ids[rows], self.attention_mask[rows], self.prompt_width, self.mask[rows],
                       [self.prompts[i] for i in picked], [self.completions[i] for i in picked])


@torch.no_grad()
def generate(policy, prompts: list[list[int]], config: PPOConfig, pad_id: int, eos_id: int,
             device: torch.device, full_length: bool = False) -> Rollout:
    """Sample one completion per prompt with the config's sampling settings, in one batch; ``full_length``:
    never end early (a step's worst case, for the dry step)."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention[row, width - len(prompt):] = 1
    settings = GenerationConfig(do_sample=True, temperature=config.temperature, top_k=config.top_k,
                                top_p=config.top_p, max_new_tokens=config.max_new_tokens, pad_token_id=pad_id,
                                eos_token_id=eos_id, min_new_tokens=config.max_new_tokens if full_length else 0)
    policy.eval()
    out = policy.generate(input_ids=ids.to(device), attention_mask=attention.to(device), generation_config=settings)
    completion = out[:, width:]
    is_eos = completion == eos_id
    mask = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # up to and including the first end-of-turn
    completion = completion.masked_fill(~mask, pad_id)
    return Rollout(input_ids=torch.cat([ids.to(device), completion], 1),
                   attention_mask=torch.cat([attention.to(device), mask.long()], 1), prompt_width=width,
                   mask=mask.float(), prompts=prompts,
                   completions=[c[m].tolist() for c, m in zip(completion.cpu(), mask.cpu())])


def policy_forward(model, value_head, rollout: Rollout, temperature: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token log-probs (B, T) of the completion under ``model`` at ``temperature``, and values (B, T)."""
    base, hidden = decoder_states(model, rollout.input_ids, rollout.attention_mask, rollout.position_ids)
    states = hidden[:, rollout.prompt_width - 1: -1]  # position t predicts completion token t
    logits = base.get_output_embeddings()(states).float() / temperature
    targets = rollout.completion_ids
    logps = logits.gather(2, targets[..., None]).squeeze(-1) - logits.logsumexp(-1)
    values = value_head(states.float()).squeeze(-1) if value_head is not None else None
    return logps, values


@torch.no_grad()
def reference_logps(policy, ref_model, rollout: Rollout, temperature: float) -> torch.Tensor:
    """The pinned reference's log-probs: the policy with its adapter disabled, or the frozen copy (full FT)."""
    if ref_model is not None:
        return policy_forward(ref_model, None, rollout, temperature)[0]
    with policy.disable_adapter():
        return policy_forward(policy, None, rollout, temperature)[0]


@dataclass
class Experience:
    """One scored rollout with everything the update needs, computed before any update."""

    rollout: Rollout
    scores: torch.Tensor
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # (B, T) per-token log pi - log ref
    kl_coef: float

    @property
    def tokens(self) -> int:
        return int(self.rollout.mask.sum().item())

    def metrics(self) -> dict:
        per_seq_kl = self.kl.sum(1)
        return {"reward": self.scores.mean().item(), "reward_std": self.scores.std().item() if len(self.scores) > 1
                else 0.0, "kl": per_seq_kl.mean().item(),
                "objective": (self.scores - self.kl_coef * per_seq_kl).mean().item(),
                "completion_length": self.rollout.mask.sum(1).mean().item(), "tokens": self.tokens}


def experience(policy, value_head, ref_model, prompts: list[list[int]], reward_fn: RewardFn, config: PPOConfig,
               pad_id: int, eos_id: int, device: torch.device, full_length: bool = False) -> Experience:
    """Generate, score, and compute old log-probs, values, KL-penalised rewards and advantages."""
    rollout = generate(policy, prompts, config, pad_id, eos_id, device, full_length)
    scores = torch.as_tensor(reward_fn(rollout.prompts, rollout.completions), dtype=torch.float32).to(device)
    with torch.no_grad():
        old_logps, old_values = policy_forward(policy, value_head, rollout, config.temperature)
        ref = reference_logps(policy, ref_model, rollout, config.temperature)
    rewards, kl = kl_penalised_rewards(scores, old_logps, ref, rollout.mask, config.kl_coef)
    advantages, returns = gae(rewards, old_values, rollout.mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, rollout.mask)
    return Experience(rollout, scores, old_logps, old_values, advantages, returns, kl, config.kl_coef)


@torch.no_grad()
def heldout_reward(policy, ref_model, prompts: list[list[int]], reward_fn: RewardFn, config: PPOConfig,
                   pad_id: int, eos_id: int, device: torch.device) -> dict:
    """Reward of the reference's and the policy's samples on the same held-out prompts (same seed), and the
    policy's KL to the reference on its own samples: what the run changed, on prompts it never trained on."""
    scores: dict[str, list[float]] = {"reference": [], "policy": []}
    kls: list[float] = []
    for who in scores:
        torch.manual_seed(config.seed + 1)
        for start in range(0, len(prompts), config.rollout_batch_size):
            batch = prompts[start:start + config.rollout_batch_size]
            if who == "policy":
                rollout = generate(policy, batch, config, pad_id, eos_id, device)
                logps = policy_forward(policy, None, rollout, config.temperature)[0]
                kl = (logps - reference_logps(policy, ref_model, rollout, config.temperature)) * rollout.mask
                kls += kl.sum(1).tolist()
            elif ref_model is not None:
                rollout = generate(ref_model, batch, config, pad_id, eos_id, device)
            else:
                with policy.disable_adapter():
                    rollout = generate(policy, batch, config, pad_id, eos_id, device)
            scores[who] += torch.as_tensor(reward_fn(rollout.prompts, rollout.completions)).float().tolist()
    gain = torch.tensor(scores["policy"]) - torch.tensor(scores["reference"])
    return {"prompts": len(prompts), "reference_reward": sum(scores["reference"]) / len(prompts),
            "policy_reward": sum(scores["policy"]) / len(prompts), "gain": gain.mean().item(),
            "gain_stderr": (gain.std() / len(prompts) ** 0.5).item() if len(prompts) > 1 else None,
            "policy_kl": sum(kls) / len(kls)}


def split_prompts(snapshot: Snapshot, tokenizer, config: PPOConfig, split: str = "train") -> list[list[int]]:
    """A split's distinct prompts (thumbs and pairs), rendered as served, keeping their last tokens."""
    texts: list[str] = []
    for paired in (False, True):
        if has_split(snapshot, paired, split):
            frame = snapshot.pairs(split) if paired else snapshot.kto(split)
            texts += frame["prompt"].to_list()
    texts = list(dict.fromkeys(texts))
    if not texts and split == "train":
        raise KtoLoopError(f"snapshot {snapshot.manifest.snapshot_id} has no train prompts to generate for")
    return [render_prompt(tokenizer, t)[-config.max_prompt_length:] for t in texts]


def sample_prompts(prompts: list[list[int]], step: int, config: PPOConfig) -> list[list[int]]:
    """Step ``step``'s prompts: a seeded draw, so a resumed run draws the same ones."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    n, size = len(prompts), config.rollout_batch_size
    rows = torch.randperm(n, generator=generator)[:size] if n >= size else torch.randint(n, (size,), generator=generator)
    return [prompts[i] for i in rows.tolist()]
