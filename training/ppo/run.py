"""PPO: online optimisation of the policy against a reward, with a per-token KL penalty to the pinned reference.

Each step samples prompts from the snapshot, generates completions with the current policy, scores them with
the reward (a pinned reward model, or any ``RewardFn``), then runs ``ppo_epochs`` passes of the clipped
surrogate + clipped value loss over minibatches, with GAE advantages on rewards ``-kl_coef * KL_t`` per token
plus the score on the last token. LoRA by default: the reference is the same weights with the adapter disabled,
so no second copy of the model is held. The output is what the offline trainer writes (adapter,
``training_meta.json``, ``metrics.jsonl``), so the registry, evaluation and promotion treat it the same.

    train_ppo(config, snapshot, reference, out_dir, reward, *, cache_dir=None, resume=False) -> RunResult
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
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ktoloop.config import ConfigError
from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot
from training.config import PPOConfig, TrainConfig  # PPOConfig lives there: no torch to load [ppo]
from training.evaluate import PreferenceScore, evaluate_preference, fill_reference, has_split
from training.ppo.guards import Budget, HackingGuard, dry_run
from training.ppo.maths import ppo_loss
from training.ppo.rollout import Experience, RewardFn, experience, heldout_reward, policy_forward, sample_prompts, \
    split_prompts
from training.reference import Reference
from training.runs import (RunResult, append_metrics, finished_run, last_metrics, load_checkpoint, run_meta,
                           save_checkpoint, truncate_metrics, write_meta)
from training.runtime import check_decision, make_trainable, save_model, setup_processes

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"
GUARD_STOPS = ("kl_bound", "reward_hacking")


@dataclass
class PPORun:
    """What the loop works on: the policy (LoRA on the reference, or a full copy beside a frozen one), its value
    head and optimizer, the prompts, the reward, and how held-out accuracy is scored."""

    config: PPOConfig
    snapshot: Snapshot
    reference: Reference
    policy: torch.nn.Module
    value_head: torch.nn.Linear
    ref_model: torch.nn.Module | None
    """The frozen reference for full fine-tuning; None with LoRA (the policy with its adapter disabled)."""
    tokenizer: object
    optimizer: torch.optim.Optimizer
    device: torch.device
    reward_fn: RewardFn
    reward_record: dict
    prompts: list[list[int]]
    eval_config: TrainConfig | None
    cache_dir: Path

    def rollout(self, step: int, full_length: bool = False) -> Experience:
        return experience(self.policy, self.value_head, self.ref_model, sample_prompts(self.prompts, step, self.config),
                          self.reward_fn, self.config, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id,
                          self.device, full_length=full_length)

    def update(self, exp: Experience) -> dict:
        return ppo_update(self.policy, self.value_head, self.optimizer, exp, self.config)

    def evaluates(self, step: int) -> bool:
        return bool(self.eval_config and self.config.eval_every and step % self.config.eval_every == 0)

    def evaluate(self) -> PreferenceScore:
        return evaluate_preference(self.policy, self.tokenizer, self.snapshot, self.reference, self.eval_config,
                                   cache_dir=self.cache_dir)


@dataclass
class RunState:
    """What a resumed run gets back besides weights and optimizer: the step, the rollout rewards since the last
    held-out evaluation (the hacking guard's window) and the first rollout's metrics (the run's before)."""

    step: int = 0
    window: list[float] = field(default_factory=list)
    first: dict | None = None


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


def train_ppo(config: PPOConfig, snapshot: Snapshot, reference: Reference, out_dir: str | Path, reward, *,
              decision=None, cache_dir: str | Path | None = None, resume: bool = False,
              override: str | None = None) -> RunResult:
    """Run PPO; see the module docstring. ``reward``: a RewardModelInfo or a RewardFn. ``decision``: the
    recorded decision about the snapshot (None: decide under the default rules, a reward model present);
    ``override``: the reason to run although it refuses PPO (``check_decision``)."""
    out_dir = Path(out_dir)
    overridden = check_decision(snapshot, "ppo", decision, override, reward_model=True)
    if (meta := finished_run(out_dir, resume)) is not None:
        return RunResult(out_dir, meta)
    if not config.has_budget():
        raise ConfigError("PPO needs a compute budget: set ppo.max_generated_tokens and/or ppo.max_seconds")
    reference.check_version(snapshot.manifest.model_version)
    reference.verify()
    started = time.time()

    run = _setup(config, snapshot, reference, reward, Path(cache_dir) if cache_dir else out_dir / "cache")
    budget = Budget(config.max_generated_tokens, config.max_seconds)
    guard = HackingGuard(config.kl_bound, config.accuracy_drop)
    state = _resume(out_dir, run, budget, guard) if resume else RunState()
    out_dir.mkdir(parents=True, exist_ok=True)
    truncate_metrics(out_dir, state.step)
    if config.max_seconds:  # the first step needs a bound too: time a worst-case one, undo it, then start the clock
        budget.observe(*dry_run(run.policy, run.value_head, run.optimizer, run.device,
                                lambda: run.update(run.rollout(state.step, full_length=True)),
                                *([run.evaluate] if run.eval_config and config.eval_every else [])))
    clock = time.perf_counter()

    stop = None
    while stop is None:
        elapsed = time.perf_counter() - clock
        stop = _stop_before_step(config, budget, state.step, elapsed, run.evaluates(state.step + 1)) or \
            _step(run, budget, guard, state, out_dir, clock)
    return _finish(run, out_dir, state, budget, guard, stop, started, overridden)


def _setup(config: PPOConfig, snapshot: Snapshot, reference: Reference, reward, cache_dir: Path) -> PPORun:
    from training.modeling import load_model

    device, _, world = setup_processes(config)
    if world > 1:
        raise KtoLoopError("PPO runs in one process; launch it without torchrun")
    torch.manual_seed(config.seed)
    policy, tokenizer = load_model(reference.path, device=device)
    reward_fn, reward_record = _reward_source(reward, reference, device)
    prompts = split_prompts(snapshot, tokenizer, config)
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
    return PPORun(config, snapshot, reference, policy, value_head, ref_model, tokenizer, optimizer, device,
                  reward_fn, reward_record, prompts, eval_config, cache_dir)


def _stop_before_step(config: PPOConfig, budget: Budget, step: int, elapsed: float, evaluates: bool):
    """(reason, detail) when the next step may not start: ``max_steps``, or its worst case overruns a budget."""
    if config.max_steps and step >= config.max_steps:
        return "max_steps", ""
    if why := budget.exhausted(config, elapsed, evaluates):
        detail = f"spent {budget.tokens} tokens, {budget.seconds + elapsed:.1f} s"
        if why == "budget_seconds":
            detail += f" of {config.max_seconds} s; the next step may take {budget.next_step_seconds(evaluates):.2f} s"
        return why, detail
    return None


def _step(run: PPORun, budget: Budget, guard: HackingGuard, state: RunState, out_dir: Path, clock: float):
    """One rollout, the KL guard, one update, a held-out evaluation when due (and the hacking guard); writes the
    step's metrics line and checkpoint. Returns (reason, detail) when a guard stops the run, else None."""
    config, stop, eval_seconds = run.config, None, None
    t0 = time.perf_counter()
    exp = run.rollout(state.step)
    budget.tokens += exp.tokens
    metrics = {"step": state.step + 1, **exp.metrics(), "tokens_total": budget.tokens}
    state.first = state.first or metrics
    state.window.append(metrics["reward"])
    if why := guard.check_kl(metrics["kl"]):
        stop = ("kl_bound", why)
    else:
        metrics.update(run.update(exp))
        state.step += 1
        if run.evaluates(state.step):
            t_eval = time.perf_counter()
            score = run.evaluate()
            eval_seconds = time.perf_counter() - t_eval
            window_reward, state.window = sum(state.window) / len(state.window), []
            metrics["eval_accuracy"] = score.accuracy
            if why := guard.check_eval(state.step, window_reward, score.accuracy, score.examples):
                stop = ("reward_hacking", why)
    step_seconds = time.perf_counter() - t0
    budget.observe(step_seconds - (eval_seconds or 0.0), eval_seconds)
    metrics.update(seconds=round(step_seconds, 4),
                   seconds_total=round(budget.seconds + time.perf_counter() - clock, 2))
    append_metrics(out_dir, metrics)
    log.info("ppo step %d: reward %.4f, kl %.4f, %d tokens so far (%.1f s/step)", metrics["step"],
             metrics["reward"], metrics["kl"], budget.tokens, step_seconds)
    if stop is None and config.checkpoint_every and state.step % config.checkpoint_every == 0:
        save_checkpoint(out_dir, state.step, run.policy, config, value_head=run.value_head, optimizer=run.optimizer,
                        tokens=budget.tokens, seconds=budget.seconds + time.perf_counter() - clock,
                        evals=guard.evals, window=state.window, first=state.first)
    return stop


def _resume(out_dir: Path, run: PPORun, budget: Budget, guard: HackingGuard) -> RunState:
    """The latest checkpoint's weights, value head, optimizer, RNG, budget spent and guard history."""
    saved = load_checkpoint(out_dir, run.policy, run.config, "ppo", value_head=run.value_head,
                            optimizer=run.optimizer)
    if saved is None:
        return RunState()
    budget.tokens, budget.seconds = saved["tokens"], saved["seconds"]
    guard.evals = saved["evals"]
    return RunState(step=saved["step"], window=saved["window"], first=saved["first"])


def _finish(run: PPORun, out_dir: Path, state: RunState, budget: Budget, guard: HackingGuard, stop, started: float,
            overridden: dict | None) -> RunResult:
    """The run's before/after on held-out prompts (its KL held to the bound too: no rollout measured the last
    update), the final held-out score, and the outputs: adapter, value head, metadata."""
    reason, detail = stop
    guard_stop = reason in GUARD_STOPS
    (log.warning if guard_stop else log.info)("PPO stopped after %d steps: %s %s", state.step, reason, detail)
    score = run.evaluate() if run.eval_config else None
    heldout = split_prompts(run.snapshot, run.tokenizer, run.config, "eval")[:run.config.eval_prompts]
    before_after = heldout_reward(run.policy, run.ref_model, heldout, run.reward_fn, run.config,
                                  run.tokenizer.pad_token_id, run.tokenizer.eos_token_id, run.device) \
        if heldout else None
    if before_after and not guard_stop and (why := guard.check_kl(before_after["policy_kl"])):
        reason, detail, guard_stop = "kl_bound", f"after the last update, on held-out prompts: {why}", True
        log.warning("PPO flagged: %s", detail)
    save_model(run.policy, run.tokenizer, run.config, out_dir)
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in run.value_head.state_dict().items()},
              out_dir / VALUE_HEAD_FILE)
    last, first = last_metrics(out_dir), state.first
    meta = run_meta(
        run.config, run.snapshot, run.reference, started,
        reward=run.reward_record, steps=state.step, examples=len(run.prompts), processes=1,
        final_train_metrics=last,
        rollouts={"first": {k: first[k] for k in ("step", "reward", "kl")} if first else None,
                  "last": {k: last[k] for k in ("step", "reward", "kl")} if last else None},
        budget={"max_generated_tokens": run.config.max_generated_tokens, "max_seconds": run.config.max_seconds,
                "generated_tokens": budget.tokens, "seconds": last.get("seconds_total", 0.0),
                "step_seconds_bound": budget.step_seconds, "eval_seconds_bound": budget.eval_seconds},
        stop={"reason": reason, "detail": detail, "guard": guard_stop, "step": state.step},
        guard_evals=guard.evals, eval=dataclasses.asdict(score) if score else None, heldout_reward=before_after,
        **({"override": overridden} if overridden else {}))
    meta["config"]["method"] = "ppo"
    return write_meta(out_dir, meta)


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


def _eval_config(snapshot: Snapshot, config: PPOConfig) -> TrainConfig | None:
    """How held-out preference accuracy is scored: DPO-style on eval pairs when there are some, else KTO."""
    for method, paired in (("dpo", True), ("kto", False)):
        if has_split(snapshot, paired, "eval"):
            return TrainConfig(method=method, beta=max(config.kl_coef, 1e-6), max_length=config.max_length,
                               max_prompt_length=config.max_prompt_length, batch_size=config.mini_batch_size,
                               device=config.device)
    return None
