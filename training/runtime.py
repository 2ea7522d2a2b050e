"""Run-time pieces every trainer shares (offline preference training, the reward model, PPO): joining the
torchrun process group, wrapping the model for LoRA, the learning-rate schedule, and writing outputs."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ktoloop.config import ConfigError
from ktoloop.decision import decide_snapshot
from ktoloop.errors import KtoLoopError
from ktoloop.methods import GateConfig
from training.config import TrainConfig

log = logging.getLogger(__name__)


class TrainingRefused(KtoLoopError):
    """The decision about the snapshot does not allow this training run; the message says why."""


def check_decision(snapshot, method: str, decision=None, override: str | None = None, *,
                   reward_model: bool = False) -> dict | None:
    """The door every trainer passes: the decision about this snapshot (sufficiency gate, method eligibility)
    allows ``method``.

    ``decision``: the ``ktoloop.decision.Decision`` the loop recorded (``flows.loop.decide``); None decides
    now from the snapshot's counts under the default rules (``GateConfig()``: refuse under 500 usable
    examples), so a direct Python call is held to them too. Refused: a decision about another snapshot, a
    decision of no training, a method it found ineligible. ``override`` (a reason) lets it through; the
    returned record goes into the run's metadata.
    """
    name = snapshot.manifest.snapshot_id
    if decision is None:
        decision = decide_snapshot(name, snapshot.manifest.counts, GateConfig(), reward_model=reward_model)
    eligibility = decision.eligibility.get(method) or {}
    problem = None
    if decision.snapshot_id != name:
        problem = f"the decision given is about snapshot {decision.snapshot_id or '(none)'!r}, not this one"
    elif not decision.train:
        problem = f"its decision is no training ({'; '.join(decision.reasons or ['none recorded'])})"
    elif method != decision.method and not eligibility.get("eligible"):
        problem = f"{method} is not eligible ({eligibility.get('reason', 'no eligibility recorded')})"
    if problem is None:
        return None
    if not override:
        raise TrainingRefused(f"snapshot {name}: {problem}; rebuild it with more data or another method, or "
                              f"override with --force --reason TEXT (recorded with the run)")
    log.warning("snapshot %s: %s; overridden: %s", name, problem, override)
    return {"reason": override, "refused_because": problem}


def make_trainable(model, config: TrainConfig):
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.full_finetune:
        return model
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    if config.lora_layers > layers:
        raise ConfigError(f"lora_layers = {config.lora_layers} but the model has {layers} layers")
    top = list(range(layers - config.lora_layers, layers)) if config.lora_layers else None
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=list(config.lora_target_modules), layers_to_transform=top,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def warmup_cosine(warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def setup_processes(config: TrainConfig) -> tuple[torch.device, int, int]:
    """(device, rank, world); joins the torchrun process group (gloo on CPU, nccl on CUDA) when launched so."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise KtoLoopError("training.device is 'cuda' but no CUDA device is available")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank, world
    return torch.device("cpu"), rank, world


def process_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def save_model(model, tokenizer, config: TrainConfig, out_dir: Path) -> None:
    model.save_pretrained(out_dir)
    if config.full_finetune:
        tokenizer.save_pretrained(out_dir)  # a whole model: loadable on its own


def lib_versions() -> dict:
    import peft
    import transformers

    return {"transformers": transformers.__version__, "peft": peft.__version__}
