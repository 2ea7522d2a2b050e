"""Summed completion log-probs, and the on-disk cache of the reference's, addressed by content.

Caching the reference is what makes a training step one forward+backward: neither a frozen copy of the model
nor an adapter-disabled forward is needed while training. Each cached value is keyed by a hash of the exact
token ids it scored (prompt, completion and the boundary between them), so a snapshot rebuilt in another row
order, a new split or a longer window can only hit values of the very same sequence, never another row's.
One cache file per (reference hash, precision).
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
from training.data import Batch, Encoded, Pair, collate

log = logging.getLogger(__name__)


def decoder_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   position_ids: torch.Tensor | None = None):
    """(base model, last hidden states): the one forward every trainer runs (through a peft wrapper), so the
    LM head, or a value or reward head, is applied to the positions that are read and no others."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kwargs = {} if position_ids is None else {"position_ids": position_ids}
    return base, base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """Sum of log p(token) over each sequence's completion tokens, shape (B,), float32.

    The LM head runs only on the positions that predict a completion token: prompt and padding positions never
    materialise vocabulary-sized logits, which is most of the activation memory at small model sizes.
    """
    base, hidden = decoder_states(model, batch.input_ids, batch.attention_mask)
    scored = batch.completion_mask[:, 1:]  # position t predicts token t+1
    rows = scored.nonzero()[:, 0]
    logits = base.get_output_embeddings()(hidden[:, :-1][scored]).float()
    targets = batch.input_ids[:, 1:][scored]
    token_logps = logits.gather(1, targets[:, None]).squeeze(1) - logits.logsumexp(-1)
    return torch.zeros(len(batch.input_ids), device=logits.device).index_add(0, rows, token_logps)


def autocast(device: torch.device):
    """bf16 autocast on CUDA (weights stay fp32), plain fp32 on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision(device: torch.device) -> str:
    return "bf16-autocast" if device.type == "cuda" else "fp32"


@torch.no_grad()
def compute_logps(model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
                  batch_size: int, label: str = "log-probs") -> torch.Tensor:
    """Log-probs of many sequences, in eval mode, batched; length-sorted so padding stays small.

    Logs ``label: done/total sequences, rate, ETA`` every ``ktoloop.progress.EVERY_S`` seconds."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda k: len(data.tokens(pairs[k])[0]) + len(data.tokens(pairs[k])[1]))
    out = torch.zeros(len(pairs))
    progress = Progress(label, len(order), "sequences", log)
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        with autocast(device):
            out[chunk] = sequence_logps(model, collate(data, [pairs[k] for k in chunk], pad_id, device)).cpu()
        progress.update(len(chunk))
    model.train(was_training)
    return out


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
            logps = compute_logps(model, data, todo, pad_id, device, batch_size, label="reference log-probs")
            self.values.update(zip(self.keys(data, todo), logps.tolist()))
            self.save()
        return len(todo)

    def get(self, data: Encoded, pairs: list[Pair], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.values[k] for k in self.keys(data, pairs)], device=device)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.values)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # two writers never share a temporary file
        torch.save({"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(-1, 16),
                    "logps": torch.tensor([self.values[k] for k in keys], dtype=torch.float64)}, tmp)
        tmp.replace(self.path)
