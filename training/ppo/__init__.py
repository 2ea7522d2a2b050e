"""PPO against a reward, with a per-token KL penalty to the pinned reference (``run``: the run loop).

One job per module: ``maths`` (rewards, GAE, clipped losses), ``rollout`` (sampling and scoring), ``guards``
(budget, KL bound, reward hacking, the dry step) and ``run`` (``train_ppo``). ``PPOConfig`` lives in
``training.config`` so that loading a config needs no torch.
"""

from training.config import PPOConfig
from training.ppo.guards import Budget, HackingGuard, dry_run
from training.ppo.maths import gae, kl_penalised_rewards, ppo_loss
from training.ppo.rollout import RewardFn, generate
from training.ppo.run import train_ppo

__all__ = ["Budget", "HackingGuard", "PPOConfig", "RewardFn", "dry_run", "gae", "generate", "kl_penalised_rewards",
           "ppo_loss", "train_ppo"]
