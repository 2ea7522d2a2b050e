"""The ``[training]`` section: every knob of a training run, validated once, saved next to every adapter.

Load from TOML with ``load_section(settings, "training", TrainConfig)``; override per run with
``dataclasses.replace(config, beta=0.3)`` (which re-runs the validation). No torch import here, so the CLI
can build and check a config without paying for it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ktoloop.config import ConfigError

METHODS = ("kto", "dpo", "ipo")  # must match training.losses.LOSSES; checked by a test
DEVICES = ("auto", "cpu", "cuda")


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
        """Short hash of the resolved config (names a run, so ``--resume`` finds it again)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class TrainConfig(LoraFields):
    method: str = "kto"
    """Loss, by name in ``training.losses.LOSSES``."""
    beta: float = 0.1
    """Strength of the pull towards the reference (KL penalty coefficient)."""
    lr: float = 5e-5
    epochs: int = 1
    max_steps: int = 0
    """Optimizer steps; 0 means ``epochs`` full passes over the train split."""
    batch_size: int = 8
    """Examples per process per forward (a KTO example is one completion, a DPO/IPO example one pair)."""
    grad_accumulation_steps: int = 1
    """Forwards per optimizer step; global batch = batch_size x grad_accumulation_steps x processes."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    """Gradient clipping; 0 disables it."""
    full_finetune: bool = False
    """Train every weight instead of a LoRA adapter (reference log-probs are still cached up front)."""
    max_length: int = 512
    """Prompt + completion tokens; longer examples keep the prompt's end and the completion's start."""
    max_prompt_length: int = 256
    """A prompt longer than this keeps only its last ``max_prompt_length`` tokens."""
    seed: int = 0
    checkpoint_every: int = 0
    """Optimizer steps between checkpoints (for ``resume``); 0 disables checkpoints."""
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False
    device: str = "auto"
    """``auto`` = CUDA when available; bf16 autocast on CUDA, fp32 on CPU."""
    reference: str = ""
    """Pinned reference name; empty = the one whose model_version matches the snapshot."""

    def __post_init__(self) -> None:
        self._check_lora("training")
        if self.method not in METHODS:
            raise ConfigError(f"training.method must be one of {list(METHODS)}, got {self.method!r}")
        if self.device not in DEVICES:
            raise ConfigError(f"training.device must be one of {list(DEVICES)}, got {self.device!r}")
        positive = ("beta", "lr", "batch_size", "grad_accumulation_steps", "max_length", "max_prompt_length",
                    "keep_checkpoints")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"training.{name} must be > 0, got {getattr(self, name)}")
        for name in ("epochs", "max_steps", "warmup_steps", "checkpoint_every", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0, got {getattr(self, name)}")
        if self.epochs == 0 and self.max_steps == 0:
            raise ConfigError("training.epochs and training.max_steps are both 0: set one of them")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"training.max_prompt_length ({self.max_prompt_length}) must be smaller than "
                              f"training.max_length ({self.max_length}) to leave room for the completion")
