"""PPO's stop rules: the compute budget (a step starts only if its worst case fits), the KL bound and the
reward-hacking guard, and the dry step that bounds the first step's time without changing the run."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ktoloop.errors import KtoLoopError
from training.config import PPOConfig
from training.runs import trainable_state


def dry_run(policy, value_head, optimizer, device: torch.device, *work: Callable[[], object]) -> list[float]:
    """Seconds each of ``work`` takes, run and then undone: trainable weights, value head, optimizer state and
    RNG are restored, so a time budget changes where a run stops, never what it computes."""
    import copy

    weights, head = trainable_state(policy), copy.deepcopy(value_head.state_dict())
    moments, rng = copy.deepcopy(optimizer.state_dict()), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    seconds = []
    for job in work:
        t0 = time.perf_counter()
        job()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.perf_counter() - t0)
    _copy_trainable(policy, weights, "the dry step")
    value_head.load_state_dict(head)
    optimizer.load_state_dict(moments)
    torch.set_rng_state(rng)
    if cuda_rng:
        torch.cuda.set_rng_state_all(cuda_rng)
    return seconds


def _copy_trainable(policy, values: dict[str, torch.Tensor], source: str) -> None:
    params = dict(policy.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            if name not in params:
                raise KtoLoopError(f"{source} does not match this model ({name}); start a fresh run")
            params[name].copy_(value)


@dataclass
class Budget:
    max_tokens: int
    max_seconds: float
    tokens: int = 0
    seconds: float = 0.0
    """Spent before this process started (resumed runs)."""
    step_seconds: float | None = None
    """Slowest rollout + update so far, the dry step's included: what a next step is assumed to take."""
    eval_seconds: float = 0.0
    """Slowest held-out evaluation so far, the dry step's included: added for a step that evaluates."""

    def observe(self, step_seconds: float, eval_seconds: float | None = None) -> None:
        self.step_seconds = max(self.step_seconds or 0.0, step_seconds)
        self.eval_seconds = max(self.eval_seconds, eval_seconds or 0.0)

    def next_step_seconds(self, evaluates: bool) -> float:
        if self.step_seconds is None:  # never guess 0 (the first step used to start on any budget)
            raise KtoLoopError("PPO cannot bound its next step's time: observe a (dry) step before checking "
                               "ppo.max_seconds")
        return self.step_seconds + (self.eval_seconds if evaluates else 0.0)

    def exhausted(self, config: PPOConfig, elapsed: float, evaluates: bool) -> str | None:
        """Why the next step may not start: its worst case would overrun a budget."""
        if self.max_tokens and self.tokens + config.rollout_tokens() > self.max_tokens:
            return "budget_tokens"
        if self.max_seconds and self.seconds + elapsed + self.next_step_seconds(evaluates) > self.max_seconds:
            return "budget_seconds"
        return None


@dataclass
class HackingGuard:
    kl_bound: float
    accuracy_drop: float
    evals: list[dict] = field(default_factory=list)
    """{"step", "reward", "accuracy"} per held-out evaluation."""

    def check_kl(self, kl: float) -> str | None:
        if kl > self.kl_bound:
            return f"KL to the reference {kl:.3f} nats exceeds ppo.kl_bound {self.kl_bound}"
        return None

    def check_eval(self, step: int, reward: float, accuracy: float, examples: int) -> str | None:
        """Reward above the best-accuracy evaluation's while accuracy fell below it by more than
        ``accuracy_drop`` and more than two standard errors (a small eval split must not trip it on noise)."""
        best = max(self.evals, key=lambda e: e["accuracy"]) if self.evals else None
        self.evals.append({"step": step, "reward": reward, "accuracy": accuracy})
        if best is None or reward <= best["reward"]:
            return None
        tolerance = max(self.accuracy_drop, 2 * (best["accuracy"] * (1 - best["accuracy"]) / examples) ** 0.5)
        if accuracy < best["accuracy"] - tolerance:
            return (f"reward rose ({best['reward']:.4f} at step {best['step']} -> {reward:.4f}) while held-out "
                    f"preference accuracy fell ({best['accuracy']:.3f} -> {accuracy:.3f}, tolerance {tolerance:.3f})")
        return None
