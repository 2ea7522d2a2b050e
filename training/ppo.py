"""PPO: online optimisation of the policy against a reward, with a per-token KL penalty to the pinned reference.

Each step samples prompts from the snapshot, generates completions with the current policy, scores them with
the reward (a pinned reward model, or any ``RewardFn``), then runs ``ppo_epochs`` passes of the clipped
surrogate + clipped value loss over minibatches, with GAE advantages on rewards ``-kl_coef * KL_t`` per token
plus the score on the last token. LoRA by default: the reference is the same weights with the adapter disabled,
so no second copy of the model is held. The output is what the offline trainer writes (adapter,
``training_meta.json``, ``metrics.jsonl``), so the registry, evaluation and promotion treat it the same.

    train_ppo(config, snapshot, reference, out_dir, reward, *, cache_dir=None, resume=False) -> PPOResult
        ``reward``: a RewardModelInfo (re-hashed, must be trained on ``reference``) or a RewardFn.

Stops, in order of checking: the compute budget (generated tokens / wall seconds: a step starts only if its
worst case fits; in seconds, that is the slowest step so far, the first one bounded by a dry step: a step with
every completion ``max_new_tokens`` long, plus a held-out evaluation when ``eval_every`` asks for them, timed
before the clock starts and then undone), ``max_steps``, the KL bound (the mean per-sequence KL of a rollout
above ``kl_bound``), and reward hacking (the mean reward since the last held-out evaluation is above the one at
the best held-out preference accuracy while the accuracy fell below that best by more than ``accuracy_drop``
and two standard errors). A guard stop is recorded in the metadata under ``stop`` (``guard: true``) so
promotion can refuse the candidate. At the end, ``heldout_reward`` samples ``eval_prompts`` held-out prompts from the reference and from the policy (same seed)
and records both mean rewards, their paired difference and the policy's KL: the run's before/after. That KL
is held to ``kl_bound`` too (no rollout measured the last update): above it, the run is flagged the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ktoloop.config import ConfigError
from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot
from training.config import PPOConfig, TrainConfig  # PPOConfig lives there: no torch to load [ppo]
from training.data import render_prompt
from training.evaluate import evaluate_preference, fill_reference, has_split
from training.reference import Reference
from training.runtime import (META_FILE, METRICS_FILE, check_decision, finished_run, last_metrics, lib_versions,
                              make_trainable, save_model, setup_processes, trainable_state, truncate_metrics)

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
VALUE_HEAD_FILE = "value_head.safetensors"
RewardFn = Callable[[list[list[int]], list[list[int]]], torch.Tensor]
"""(prompt token ids, completion token ids) -> one score per completion. Completions end at (and include) the
end-of-turn token when the policy produced one."""


# ----------------------------------------------------------------------------------------------- the maths

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


# ---------------------------------------------------------------------------------------------- rollouts

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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                position_ids=rollout.position_ids).last_hidden_state
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


# -------------------------------------------------------------------------------------------------- the step

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


def ppo_update(policy, value_head, optimizer, exp: Experience, config: PPOConfig) -> dict:
    """``ppo_epochs`` shuffled passes of minibatch updates over one experience batch; returns mean stats."""
    policy.train()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(config.ppo_epochs):
        order = torch.randperm(len(exp.scores), device=exp.scores.device)
        for start in range(0, len(order), config.mini_batch_size):
            rows = order[start: start + config.mini_batch_size]
            logps, values = policy_forward(policy, value_head, exp.rollout.select(rows), config.temperature)
            loss, stats = ppo_loss(logps, values, exp.old_logps[rows], exp.old_values[rows], exp.advantages[rows],
                                   exp.returns[rows], exp.rollout.mask[rows], config)
            loss.backward()
            stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in totals.items()}


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


# --------------------------------------------------------------------------------------------- stop rules

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


# --------------------------------------------------------------------------------------------------- the run

@dataclass
class PPOResult:
    out_dir: Path
    meta: dict

    @property
    def eval(self) -> dict | None:
        return self.meta.get("eval")

    @property
    def stop(self) -> dict:
        return self.meta["stop"]


def train_ppo(config: PPOConfig, snapshot: Snapshot, reference: Reference, out_dir: str | Path, reward, *,
              cache_dir: str | Path | None = None, resume: bool = False, override: str | None = None) -> PPOResult:
    """Run PPO; see the module docstring. ``reward``: a RewardModelInfo or a RewardFn. ``override``: the
    reason to run on a snapshot whose decision refuses PPO (``check_decision``)."""
    from training.modeling import load_model
    out_dir = Path(out_dir)
    overridden = check_decision(snapshot, "ppo", override)
    if (meta := finished_run(out_dir, resume)) is not None:
        return PPOResult(out_dir, meta)
    if not config.has_budget():
        raise ConfigError("PPO needs a compute budget: set ppo.max_generated_tokens and/or ppo.max_seconds")
    reference.check_version(snapshot.manifest.model_version)
    reference.verify()
    device, _, world = setup_processes(config)
    if world > 1:
        raise KtoLoopError("PPO runs in one process; launch it without torchrun")
    cache_dir = Path(cache_dir) if cache_dir else out_dir / "cache"
    started = time.time()

    torch.manual_seed(config.seed)
    policy, tokenizer = load_model(reference.path, device=device)
    reward_fn, reward_record = _reward_source(reward, reference, device)
    prompts = _prompts(snapshot, tokenizer, config)
    eval_config = _eval_config(snapshot, config)
    if eval_config:  # cache held-out reference log-probs while the policy still *is* the reference
        fill_reference(policy, tokenizer, snapshot, reference, eval_config, "eval", cache_dir)
    ref_model = load_model(reference.path, device=device)[0].requires_grad_(False) if config.full_finetune else None
    policy = make_trainable(policy, config)
    value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(device)
    torch.nn.init.zeros_(value_head.weight)
    torch.nn.init.zeros_(value_head.bias)
    params = [p for p in policy.parameters() if p.requires_grad] + list(value_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    budget = Budget(config.max_generated_tokens, config.max_seconds)
    guard = HackingGuard(config.kl_bound, config.accuracy_drop)
    state = {"step": 0, "window": [], "first": None}
    if resume:
        _load_checkpoint(out_dir, policy, value_head, optimizer, config, budget, guard, state)
    out_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(out_dir / METRICS_FILE, state["step"])
    step, stop = state["step"], None
    evaluates = lambda s: bool(eval_config and config.eval_every and s % config.eval_every == 0)  # noqa: E731
    if config.max_seconds:  # the first step needs a bound too: time a worst-case one, undo it, then start the clock
        def worst_step() -> None:
            ppo_update(policy, value_head, optimizer, experience(
                policy, value_head, ref_model, _sample(prompts, step, config), reward_fn, config,
                tokenizer.pad_token_id, tokenizer.eos_token_id, device, full_length=True), config)

        def evaluation() -> None:
            evaluate_preference(policy, tokenizer, snapshot, reference, eval_config, cache_dir=cache_dir)

        work = [worst_step, evaluation] if eval_config and config.eval_every else [worst_step]
        budget.observe(*dry_run(policy, value_head, optimizer, device, *work))
    clock = time.perf_counter()

    while stop is None:
        if config.max_steps and step >= config.max_steps:
            stop = ("max_steps", "")
            break
        if why := budget.exhausted(config, time.perf_counter() - clock, evaluates(step + 1)):
            detail = f"spent {budget.tokens} tokens, {budget.seconds + time.perf_counter() - clock:.1f} s"
            if why == "budget_seconds":
                detail += (f" of {config.max_seconds} s; the next step may take "
                           f"{budget.next_step_seconds(evaluates(step + 1)):.2f} s")
            stop = (why, detail)
            break
        t0 = time.perf_counter()
        eval_seconds = None
        exp = experience(policy, value_head, ref_model, _sample(prompts, step, config), reward_fn, config,
                         tokenizer.pad_token_id, tokenizer.eos_token_id, device)
        budget.tokens += exp.tokens
        metrics = {"step": step + 1, **exp.metrics(), "tokens_total": budget.tokens}
        state["first"] = state["first"] or metrics
        state["window"].append(metrics["reward"])
        if why := guard.check_kl(metrics["kl"]):
            stop = ("kl_bound", why)
        else:
            metrics.update(ppo_update(policy, value_head, optimizer, exp, config))
            step += 1
            if evaluates(step):
                t_eval = time.perf_counter()
                score = evaluate_preference(policy, tokenizer, snapshot, reference, eval_config, cache_dir=cache_dir)
                eval_seconds = time.perf_counter() - t_eval
                window_reward = sum(state["window"]) / len(state["window"])
                state["window"] = []
                metrics["eval_accuracy"] = score.accuracy
                if why := guard.check_eval(step, window_reward, score.accuracy, score.examples):
                    stop = ("reward_hacking", why)
        step_seconds = time.perf_counter() - t0
        budget.observe(step_seconds - (eval_seconds or 0.0), eval_seconds)
        metrics.update(seconds=round(step_seconds, 4), seconds_total=round(budget.seconds + time.perf_counter() - clock, 2))
        with (out_dir / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        log.info("ppo step %d: reward %.4f, kl %.4f, %d tokens so far (%.1f s/step)", metrics["step"],
                 metrics["reward"], metrics["kl"], budget.tokens, step_seconds)
        if stop is None and config.checkpoint_every and step % config.checkpoint_every == 0:
            _save_checkpoint(out_dir, step, policy, value_head, optimizer, config,
                             budget.seconds + time.perf_counter() - clock, budget, guard, state)

    reason, detail = stop
    guard_stop = reason in ("kl_bound", "reward_hacking")
    (log.warning if guard_stop else log.info)("PPO stopped after %d steps: %s %s", step, reason, detail)
    score = evaluate_preference(policy, tokenizer, snapshot, reference, eval_config, cache_dir=cache_dir) \
        if eval_config else None
    heldout = _prompts(snapshot, tokenizer, config, "eval")[:config.eval_prompts]
    before_after = heldout_reward(policy, ref_model, heldout, reward_fn, config, tokenizer.pad_token_id,
                                  tokenizer.eos_token_id, device) if heldout else None
    # no rollout has measured the policy after its last update: its held-out KL is held to the same bound
    if before_after and not guard_stop and (why := guard.check_kl(before_after["policy_kl"])):
        reason, detail, guard_stop = "kl_bound", f"after the last update, on held-out prompts: {why}", True
        log.warning("PPO flagged: %s", detail)
    save_model(policy, tokenizer, config, out_dir)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, out_dir / VALUE_HEAD_FILE)
    meta = _meta(config, snapshot, reference, reward_record, step, len(prompts), started, score, out_dir, budget,
                 {"reason": reason, "detail": detail, "guard": guard_stop, "step": step}, guard, state["first"])
    meta["heldout_reward"] = before_after
    if overridden:
        meta["override"] = overridden
    meta["versions"] = {"torch": torch.__version__, **lib_versions()}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return PPOResult(out_dir, meta)


# ------------------------------------------------------------------------------------------------ helpers

def _reward_source(reward, reference: Reference, device) -> tuple[RewardFn, dict]:
    """A pinned reward model (verified, loaded) or a plain function, and how the metadata names it."""
    from training.reward import RewardModelInfo, load_reward_model

    if isinstance(reward, RewardModelInfo):
        model = load_reward_model(reward, reference, device)
        return model.score, {"kind": "reward_model", "name": reward.name, "sha256": reward.sha256,
                             "path": reward.path, "snapshot": reward.snapshot, "eval": reward.eval}
    if callable(reward):
        return reward, {"kind": "function", "name": getattr(reward, "__name__", type(reward).__name__)}
    raise KtoLoopError(f"PPO needs a reward model or a reward function, got {type(reward).__name__}; train one "
                       f"with `ktoloop reward train --snapshot ID`")


def _prompts(snapshot: Snapshot, tokenizer, config: PPOConfig, split: str = "train") -> list[list[int]]:
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


def _sample(prompts: list[list[int]], step: int, config: PPOConfig) -> list[list[int]]:
    """Step ``step``'s prompts: a seeded draw, so a resumed run draws the same ones."""
    generator = torch.Generator().manual_seed(config.seed * 100_003 + step)
    n, size = len(prompts), config.rollout_batch_size
    rows = torch.randperm(n, generator=generator)[:size] if n >= size else torch.randint(n, (size,), generator=generator)
    return [prompts[i] for i in rows.tolist()]


def _eval_config(snapshot: Snapshot, config: PPOConfig) -> TrainConfig | None:
    """How held-out preference accuracy is scored: DPO-style on eval pairs when there are some, else KTO."""
    for method, paired in (("dpo", True), ("kto", False)):
        if has_split(snapshot, paired, "eval"):
            return TrainConfig(method=method, beta=max(config.kl_coef, 1e-6), max_length=config.max_length,
                               max_prompt_length=config.max_prompt_length, batch_size=config.mini_batch_size,
                               device=config.device)
    return None


def _save_checkpoint(out_dir: Path, step: int, policy, value_head, optimizer, config: PPOConfig, seconds: float,
                     budget: Budget, guard: HackingGuard, state: dict) -> None:
    import shutil

    root = out_dir / CHECKPOINTS
    final, tmp = root / f"step-{step:06d}", root / f".step-{step:06d}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save({"step": step, "config": config.fingerprint(), "trainable": trainable_state(policy),
                "value_head": value_head.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "tokens": budget.tokens, "seconds": seconds, "evals": guard.evals,
                "window": state["window"], "first": state["first"]}, tmp / "state.pt")
    tmp.rename(final)
    for old in sorted(root.glob("step-*"))[: -config.keep_checkpoints]:
        shutil.rmtree(old)


def _load_checkpoint(out_dir: Path, policy, value_head, optimizer, config: PPOConfig, budget: Budget,
                     guard: HackingGuard, state: dict) -> None:
    """Restore the latest checkpoint: weights, value head, optimizer, RNG, budget spent, guard history."""
    found = sorted((out_dir / CHECKPOINTS).glob("step-*"))
    if not found:
        return
    saved = torch.load(found[-1] / "state.pt", weights_only=False)
    if saved["config"] != config.fingerprint():
        raise KtoLoopError(f"checkpoint {found[-1]} was written with another ppo config ({saved['config']} != "
                           f"{config.fingerprint()}); only the budget (max_generated_tokens, max_seconds, max_steps) "
                           f"may change on --resume")
    _copy_trainable(policy, saved["trainable"], f"checkpoint {found[-1]}")
    value_head.load_state_dict(saved["value_head"])
    optimizer.load_state_dict(saved["optimizer"])
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda_rng"])
    budget.tokens, budget.seconds = saved["tokens"], saved["seconds"]
    guard.evals = saved["evals"]
    state.update(step=saved["step"], window=saved["window"], first=saved["first"])


def _meta(config, snapshot, reference, reward_record, steps, n_prompts, started, score, out_dir, budget, stop,
          guard, first) -> dict:
    last = last_metrics(out_dir)
    return {
        "config": {**config.to_dict(), "method": "ppo"},
        "config_fingerprint": config.fingerprint(),
        "adapter": "full" if config.full_finetune else "lora",
        "snapshot": {"id": snapshot.manifest.snapshot_id, "content_sha256": snapshot.manifest.content_sha256,
                     "model_version": snapshot.manifest.model_version, "kto_weights": snapshot.manifest.kto_weights},
        "reference": {"name": reference.name, "model_version": reference.model_version, "path": reference.path,
                      "sha256": reference.sha256},
        "reward": reward_record,
        "steps": steps, "examples": n_prompts, "processes": 1,
        "final_train_metrics": last,
        "rollouts": {"first": {k: first[k] for k in ("step", "reward", "kl")} if first else None,
                     "last": {k: last[k] for k in ("step", "reward", "kl")} if last else None},
        "budget": {"max_generated_tokens": config.max_generated_tokens, "max_seconds": config.max_seconds,
                   "generated_tokens": budget.tokens, "seconds": last.get("seconds_total", 0.0),
                   "step_seconds_bound": budget.step_seconds, "eval_seconds_bound": budget.eval_seconds},
        "stop": stop,
        "guard_evals": guard.evals,
        "eval": dataclasses.asdict(score) if score else None,
        "seconds": round(time.time() - started, 2),
    }
