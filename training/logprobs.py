"""Summed completion log-probs, and the on-disk cache of the reference's, addressed by content.

Two ways to the frozen reference's log-probs, both exact:
- the shared trunk (``shared_trunk``): LoRA on the top layers leaves the layers below computing exactly what
  the reference computes, so the policy's own forward yields the reference's hidden state at the lowest
  adapted layer, and the reference costs only the layers above it, run again with the adapter disabled
  (``policy_and_reference_logps``; SmolLM2 with the demo's top 8 of 30: 8/30 of a forward, in the step);
- the on-disk cache (``ReferenceCache``), filled once before training, for everything else (full fine-tuning,
  LoRA on every layer, a merged model). Each cached value is keyed by a hash of the exact token ids it scored
  (prompt, completion and the boundary between them), so a snapshot rebuilt in another row order, a new split
  or a longer window can only hit values of the very same sequence, never another row's. One cache file per
  (reference hash, precision).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

from ktoloop.progress import Progress
from training import packing
from training.data import Batch, Encoded, Pair

log = logging.getLogger(__name__)


def decoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None):
    """(base model, last hidden states): the one forward every trainer runs (through a peft wrapper), so the
    LM head, or a value or reward head, is applied to the positions that are read and no others."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    return base, base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def sequence_logps(model, batch: Batch | packing.PackedBatch) -> torch.Tensor:
    """Sum of log p(token) over each sequence's completion tokens, shape (sequences,), float32."""
    base, hidden = decoder_states(model, batch.input_ids, batch.attention_mask, batch.position_ids)
    return completion_logps(base, hidden, batch)


def completion_logps(base, hidden: torch.Tensor, batch: Batch | packing.PackedBatch) -> torch.Tensor:
    """The LM head on the positions that predict a completion token, summed per sequence: prompt and padding
    positions never materialise vocabulary-sized logits, which is most of the activation memory at small
    model sizes."""
    rows, columns, targets, owners = batch.scored
    logits = base.get_output_embeddings()(hidden[rows, columns]).float()
    token_logps = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)
    return torch.zeros(batch.size, device=logits.device).index_add(0, owners, token_logps)


def shared_trunk(model) -> int:
    """How many bottom decoder layers a peft policy computes exactly as its frozen reference does: those below
    the lowest layer holding a trainable parameter, when nothing else trains (embeddings, norms) and no dropout
    outside the adapters is active. 0: nothing shared (full fine-tuning, LoRA on the lowest layer, a merged
    model, an architecture without ``layers`` and ``norm``)."""
    if not hasattr(model, "disable_adapter"):
        return 0
    decoder = model.get_base_model().get_decoder()
    if not (hasattr(decoder, "layers") and hasattr(decoder, "norm")):
        return 0

    def changed(module) -> int:  # parameters that make the policy differ from the reference
        return sum(p.requires_grad or "lora_" in n or "modules_to_save" in n for n, p in module.named_parameters())

    adapted = [i for i, layer in enumerate(decoder.layers) if changed(layer)]
    outside_layers = changed(decoder) - sum(changed(layer) for layer in decoder.layers)
    dropout = getattr(decoder.config, "attention_dropout", 0.0) or any(
        isinstance(m, torch.nn.Dropout) and m.p > 0 for name, m in decoder.named_modules() if "lora_" not in name)
    if not adapted or outside_layers or dropout:
        return 0
    return adapted[0]


def policy_and_reference_logps(model, batch: Batch | packing.PackedBatch,
                               shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The policy's completion log-probs (with grad where grad is on) and the reference's (no grad), from one
    pass through the ``shared`` bottom layers (``shared_trunk``): the reference re-runs only the layers above,
    with the adapter disabled, from the hidden state the policy's forward computed at layer ``shared``."""
    decoder = model.get_base_model().get_decoder()
    captured: dict = {}

    def keep(_module, args, kwargs):
        captured.setdefault("call", (args, kwargs))  # a checkpointed layer's recomputation calls it again

    handle = decoder.layers[shared].register_forward_pre_hook(keep, with_kwargs=True)
    try:
        policy = sequence_logps(model, batch)
    finally:
        handle.remove()
    (hidden, *args), kwargs = captured["call"]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "past_key_value")}
    with torch.no_grad(), model.disable_adapter():
        hidden = hidden.detach()
        for layer in decoder.layers[shared:]:
            out = layer(hidden, *args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        reference = completion_logps(model.get_base_model(), decoder.norm(hidden), batch)
    return policy, reference


def frozen_reference(model):
    """A context in which a peft policy computes as its reference (the adapter disabled); a no-op otherwise."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" else "fp32"


def compute_logps(model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
                  batch_size: int, label: str = "log-probs") -> torch.Tensor:
    """Log-probs of many sequences, in eval mode, batched: longest first so padding stays small, and sequences
    that share a prompt (a pair's two answers, KTO's mismatched sequences) share a row (``training.packing``).

    Logs ``label: done/total sequences, rate, ETA`` every ``ktoloop.progress.EVERY_S`` seconds."""
    return _batched(lambda batch: (sequence_logps(model, batch),), 1, model, data, pairs, pad_id, device,
                    batch_size, label)[0]


def compute_policy_and_reference(model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
                                 batch_size: int, shared: int, label: str = "log-probs"):
    """``compute_logps`` of a policy and of its reference at once, through their ``shared`` trunk."""
    return _batched(lambda batch: policy_and_reference_logps(model, batch, shared), 2, model, data, pairs, pad_id,
                    device, batch_size, label)


@torch.no_grad()
def _batched(score, outputs: int, model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
             batch_size: int, label: str) -> tuple[torch.Tensor, ...]:
    """``outputs`` tensors of per-sequence values, ``score(batch)`` giving each batch's; a batch holds at most
    ``batch_size`` sequences."""
    was_training = model.training
    model.eval()
    # a row holds a pair (two completions of one prompt) or more: each sequence is at most max_length long
    rows = packing.plan_rows([data.tokens(p) for p in pairs], max_tokens=2 * data.max_length)
    outs = tuple(torch.zeros(len(pairs)) for _ in range(outputs))
    progress = Progress(label, len(pairs), "sequences", log)
    for chunk in packing.batches(rows, max_sequences=batch_size):
        batch = packing.collate_rows(chunk, pad_id, device)
        with autocast(device):
            values = score(batch)
        for out, value in zip(outs, values):
            out[batch.sequences] = value.cpu()
        progress.update(batch.size)
    model.train(was_training)
    return outs


CACHE_FORMAT = 2
"""Part of the cache file's name: files of the position-addressed format 1 are never read."""


def sequence_key(prompt: list[int], completion: list[int]) -> bytes:
    """16-byte blake2b of one scored sequence: its token ids and where the completion starts."""
    digest = hashlib.blake2b(len(prompt).to_bytes(4, "little"), digest_size=16)
    digest.update(torch.tensor(prompt + completion, dtype=torch.int64).numpy().tobytes())
    return digest.digest()


class ReferenceCache:
    """sequence_key -> reference log-prob, for one (reference, precision); see the module docstring."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[bytes, float] = {}
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            self.values = {bytes(k): float(v) for k, v in zip(saved["keys"].numpy(), saved["logps"].tolist())}

    @classmethod
    def for_reference(cls, cache_dir: Path, reference_sha256: str, device: torch.device) -> "ReferenceCache":
        fields = {"format": CACHE_FORMAT, "reference": reference_sha256, "precision": precision(device)}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        return cls(Path(cache_dir) / f"reflogps-{key}.pt")

    @staticmethod
    def keys(data: Encoded, pairs: list[Pair]) -> list[bytes]:
        return [sequence_key(*data.tokens(p)) for p in pairs]

    def missing(self, data: Encoded, pairs: list[Pair]) -> list[Pair]:
        """The distinct sequences of ``pairs`` (first pair naming each) that have no cached value."""
        todo: dict[bytes, Pair] = {}
        for key, pair in zip(self.keys(data, pairs), pairs):
            if key not in self.values:
                todo.setdefault(key, pair)
        return list(todo.values())

    def fill(self, model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
             batch_size: int) -> int:
        """Compute and save whatever ``pairs`` are not cached yet; returns how many were computed."""
        todo = self.missing(data, pairs)
        if todo:
            log.info("reference log-probs: computing %d sequences once (cached at %s)", len(todo), self.path)
            self.add(data, todo, compute_logps(model, data, todo, pad_id, device, batch_size,
                                               label="reference log-probs"))
        return len(todo)

    def add(self, data: Encoded, pairs: list[Pair], logps: torch.Tensor) -> None:
        """Keep values computed elsewhere (a shared-trunk pass) and save them."""
        self.values.update(zip(self.keys(data, pairs), logps.tolist()))
        self.save()

    def get(self, data: Encoded, pairs: list[Pair], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.values[k] for k in self.keys(data, pairs)], device=device)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.values)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # two writers never share a temporary file
        torch.save({"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(-1, 16),
                    "logps": torch.tensor([self.values[k] for k in keys], dtype=torch.float64)}, tmp)
        tmp.replace(self.path)
