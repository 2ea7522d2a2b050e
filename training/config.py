"""The trainers' sections, ``[training]``, ``[reward]`` and ``[ppo]``: every knob of a run, validated once, saved
next to every adapter.

Load from TOML with ``load_section(settings, "training", TrainConfig)``; override per run with
``dataclasses.replace(config, beta=0.3)`` (which re-runs the validation). No torch import here, so every
command validates these sections when it loads the file without paying for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields

from ktoloop.config import ConfigError
from ktoloop.methods import OFFLINE

DEVICES = ("auto", "cpu", "cuda")
ADDED_FIELDS = frozenset({"kl_pairs", "group_by_length"})
"""Fields added after their section first shipped; at their defaults they leave ``fingerprint`` unchanged."""


@dataclass(frozen=True)
class LoraFields:
    """The adapter fields of every trainer's section (``[training]``, ``[reward]``, ``[ppo]``), checked here once.

    A subclass calls ``_check_lora(section)`` from its ``__post_init__`` and has ``full_finetune`` (a field, or
    a class constant where full fine-tuning is not offered); ``training.runtime.make_trainable`` reads them.
    """

    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] | list[str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    lora_layers: int = 0
    """LoRA on the top N transformer layers only (0 = all): backward then stops at the lowest adapted layer
    (SmolLM2 on CPU, top 8 of 30: 3.5 s instead of 7 s per 16 x 192-token step)."""

    def _check_lora(self, section: str) -> None:
        object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
        if self.full_finetune:
            return
        for name in ("lora_r", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{section}.{name} must be > 0, got {getattr(self, name)} (or set full_finetune)")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"{section}.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules:
            raise ConfigError(f"{section}.lora_target_modules is empty")
        if self.lora_layers < 0:
            raise ConfigError(f"{section}.lora_layers must be >= 0, got {self.lora_layers}")

    def to_dict(self) -> dict:
        return {**asdict(self), "lora_target_modules": list(self.lora_target_modules)}

    def fingerprint(self) -> str:
        """Short hash of the resolved config (names a run, so ``--resume`` finds it again). Fields added
        after a config's first release (``ADDED_FIELDS``) count only when set away from their default, so a
        config that does not use them keeps the fingerprint, and the model ids, it always had."""
        added = {f.name: f.default for f in fields(self) if f.name in ADDED_FIELDS}
        kept = {k: v for k, v in self.to_dict().items() if not (k in added and v == added[k])}
        return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class RunFields(LoraFields):
    """The fields every trainer's run has, with their checks written once; each section sets its own defaults
    (``lr`` above all) by redeclaring the field."""

    lr: float = 5e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    max_length: int = 512
    """Prompt + completion tokens; longer examples keep the prompt's end and the completion's start."""
    max_prompt_length: int = 256
    """A prompt longer than this keeps only its last ``max_prompt_length`` tokens."""
    seed: int = 0
    device: str = "auto"
    """``auto`` = CUDA when available; bf16 autocast on CUDA, fp32 on CPU."""
    reference: str = ""
    """Pinned reference name; empty = the one whose model_version matches the snapshot."""

    def _check_run(self, section: str, positive: tuple[str, ...] = (), non_negative: tuple[str, ...] = ()) -> None:
        """The shared checks plus the section's own ``positive`` (> 0) and ``non_negative`` (>= 0) fields."""
        self._check_lora(section)
        if self.device not in DEVICES:
            raise ConfigError(f"{section}.device must be one of {list(DEVICES)}, got {self.device!r}")
        for name in ("lr", "max_length", "max_prompt_length", *positive):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{section}.{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm", *non_negative):
            if getattr(self, name) < 0:
                raise ConfigError(f"{section}.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"{section}.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"{section}.max_length ({self.max_length}) to leave room for the completion")


@dataclass(frozen=True)
class TrainConfig(RunFields):
    method: str = "kto"
    """An offline method of ``ktoloop.methods.METHODS`` (its loss is ``training.losses.<method>_loss``)."""
    beta: float = 0.1
    """Strength of the pull towards the reference (KL penalty coefficient)."""
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 means ``epochs`` full passes over the train split."""
    batch_size: int = 8
    """Examples per process per forward (a KTO example is one completion, a DPO/IPO example one pair)."""
    grad_accumulation_steps: int = 1
    """Forwards per optimizer step; global batch = batch_size x grad_accumulation_steps x processes."""
    warmup_steps: int = 0
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter (reference log-probs are still cached up front)."""
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (for ``resume``); 0 disables checkpoints."""
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    kl_pairs: int = 0
    """KTO: mismatched pairs per micro-batch that estimate the KL baseline z (0 = all ``batch_size``, as the
    KTO paper and TRL do). z is a detached, clamped-at-0 mean over those pairs: k < batch_size estimates the
    same mean with ~batch_size/k times its variance and no bias before the clamp, and the no-grad KL forward
    then costs k/batch_size of a full one (``benchmarks/bench_train.py`` reports the held-out effect)."""
    group_by_length: bool = False
    """Cut each epoch's micro-batches from windows of similar-length examples (then shuffle the batches), so
    padding stays small; every batch's loss is exact, only which examples share a batch changes."""

    def __post_init__(self) -> None:
        if self.method not in OFFLINE:
            raise ConfigError(f"training.method must be one of {list(OFFLINE)}, got {self.method!r}")
        self._check_run("training", positive=("beta", "batch_size", "grad_accumulation_steps", "keep_checkpoints"),
                        non_negative=("epochs", "max_steps", "warmup_steps", "checkpoint_every", "kl_pairs"))
        if self.kl_pairs > self.batch_size:
            raise ConfigError(f"training.kl_pairs must be <= training.batch_size ({self.batch_size}), "
                              f"got {self.kl_pairs}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("training.epochs and training.max_steps are both 0: set one of them")


@dataclass(frozen=True)
class RewardConfig(RunFields):
    """The ``[reward]`` section."""

    lr: float = 1e-4
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 means ``epochs`` passes over the larger of (pairs, unpaired thumbs)."""
    batch_size: int = 8
    """Pairs and unpaired thumbs per step (each)."""
    unpaired_weight: float = 1.0
    """Weight of the logistic thumb loss next to the Bradley-Terry pair loss."""

    # read by training.runtime.make_trainable (shared LoRA set-up): the reward model is always a LoRA adapter
    full_finetune = False
    gradient_checkpointing = False

    def __post_init__(self) -> None:
        self._check_run("reward", positive=("batch_size",), non_negative=("epochs", "max_steps", "unpaired_weight"))
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("reward.epochs and reward.max_steps are both 0: set one of them")


BUDGET_FIELDS = ("max_generated_tokens", "max_seconds", "max_steps")  # may grow on --resume


@dataclass(frozen=True)
class PPOConfig(RunFields):
    """The ``[ppo]`` section. A run needs a budget: ``max_generated_tokens`` and/or ``max_seconds``."""

    max_generated_tokens: int = 0
    """Budget: generated tokens over the whole run (resumes included); 0 = no token budget."""
    max_seconds: float = 0.0
    """Budget: wall seconds of the PPO loop over the whole run (resumes included; model loading, the dry step
    that bounds the first step, and the final evaluation excluded); 0 = no time budget."""
    max_steps: int = 0
    """PPO steps (rollout + update); 0 = until the budget is spent."""
    rollout_batch_size: int = 16
    """Prompts generated for per step."""
    mini_batch_size: int = 8
    ppo_epochs: int = 4
    """Passes over each rollout."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0
    """0 = off. top_k / top_p make sampling differ from the softmax the ratios use: keep them off unless needed."""
    top_p: float = 1.0
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient (the reward is score - kl_coef * sum_t KL_t)."""
    kl_bound: float = 10.0
    """Stop when a rollout's mean per-sequence KL to the reference (nats) exceeds this."""
    accuracy_drop: float = 0.05
    """Reward-hacking guard: tolerated fall of held-out preference accuracy below its best while reward rises
    (at least two standard errors of the eval split's accuracy)."""
    eval_every: int = 10
    """Steps between held-out preference evaluations (the hacking guard); 0 = only at the end."""
    eval_prompts: int = 32
    """Held-out prompts (the eval split's) sampled from the reference and from the final policy with the same
    seed and scored: the run's reward before/after and the policy's KL, in training_meta.json; 0 = skip."""
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    whiten_advantages: bool = True
    lr: float = 1e-5
    full_finetune: bool = False
    lora_dropout: float = 0.0
    """0 by default: dropout would make the first PPO epoch's ratios differ from 1."""
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    reward_model: str = ""
    """Pinned reward model name; empty = the newest trained for the reference."""

    gradient_checkpointing = False  # read by training.runtime.make_trainable; generation needs the KV cache

    def __post_init__(self) -> None:
        self._check_run("ppo", positive=("rollout_batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens",
                                         "temperature", "clip_range", "clip_range_value", "kl_bound",
                                         "keep_checkpoints"),
                        non_negative=("max_generated_tokens", "max_seconds", "max_steps", "top_k", "kl_coef",
                                      "accuracy_drop", "eval_every", "eval_prompts", "vf_coef", "checkpoint_every"))
        for name in ("gamma", "lam", "top_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"ppo.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.mini_batch_size > self.rollout_batch_size:
            raise ConfigError(f"ppo.mini_batch_size ({self.mini_batch_size}) exceeds ppo.rollout_batch_size "
                              f"({self.rollout_batch_size})")
        if 0 < self.max_generated_tokens < self.rollout_tokens():
            raise ConfigError(f"ppo.max_generated_tokens ({self.max_generated_tokens}) is below one rollout "
                              f"(rollout_batch_size x max_new_tokens = {self.rollout_tokens()})")

    def rollout_tokens(self) -> int:
        """The most tokens one step can generate."""
        return self.rollout_batch_size * self.max_new_tokens

    def has_budget(self) -> bool:
        return self.max_generated_tokens > 0 or self.max_seconds > 0

    def fingerprint(self) -> str:
        """Hash of everything but the budget: a resumed run may be given more tokens, steps or seconds."""
        import hashlib

        fields = {k: v for k, v in self.to_dict().items() if k not in BUDGET_FIELDS}
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]
