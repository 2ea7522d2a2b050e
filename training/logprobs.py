"""Summed completion log-probs, and the on-disk cache of the reference's, computed once per
(reference hash, snapshot hash, split, tokenisation, precision).

Caching the reference up front is what makes a training step one forward+backward: neither a frozen copy of
the model nor an adapter-disabled forward is needed while training.
"""

from __future__ import annotations

import logging

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from training.data import Batch, Encoded, Pair, collate

log = logging.getLogger(__name__)


def sequence_logps(model, batch: Batch) -> torch.Tensor:
    """Sum of log p(token) over each sequence's completion tokens, shape (B,), float32.

    The LM head runs only on the positions that predict a completion token: prompt and padding positions never
    materialise vocabulary-sized logits, which is most of the activation memory at small model sizes.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
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
                  batch_size: int) -> torch.Tensor:
    """Log-probs of many sequences, in eval mode, batched; length-sorted so padding stays small."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(pairs)), key=lambda k: len(data.tokens(pairs[k])[0]) + len(data.tokens(pairs[k])[1]))
    out = torch.zeros(len(pairs))
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        with autocast(device):
            out[chunk] = sequence_logps(model, collate(data, [pairs[k] for k in chunk], pad_id, device)).cpu()
    model.train(was_training)
    return out


class ReferenceCache:
    """(prompt row, completion row) -> reference log-prob for one (reference, snapshot split, tokenisation)."""

    def __init__(self, path: Path):
        self.path = path
        self.values: dict[Pair, float] = {}
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            self.values = {(int(p), int(c)): float(v) for (p, c), v in zip(saved["pairs"].tolist(), saved["logps"])}

    @classmethod
    def for_split(cls, cache_dir: Path, reference_sha256: str, snapshot_sha256: str, split: str, paired: bool,
                  tokenization: dict, device: torch.device) -> "ReferenceCache":
        fields = {"reference": reference_sha256, "snapshot": snapshot_sha256, "split": split, "paired": paired,
                  "tokenization": tokenization, "precision": precision(device)}
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        return cls(Path(cache_dir) / f"reflogps-{key}.pt")

    def missing(self, pairs: list[Pair]) -> list[Pair]:
        return list(dict.fromkeys(p for p in pairs if p not in self.values))

    def fill(self, model, data: Encoded, pairs: list[Pair], pad_id: int, device: torch.device,
             batch_size: int) -> int:
        """Compute and save whatever ``pairs`` are not cached yet; returns how many were computed."""
        todo = self.missing(pairs)
        if todo:
            log.info("reference log-probs: computing %d sequences once (cached at %s)", len(todo), self.path)
            logps = compute_logps(model, data, todo, pad_id, device, batch_size)
            self.values.update(zip(todo, logps.tolist()))
            self.save()
        return len(todo)

    def get(self, pairs: list[Pair], device: torch.device) -> torch.Tensor:
        return torch.tensor([self.values[p] for p in pairs], device=device)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self.values)
        tmp = self.path.with_suffix(".tmp")
        torch.save({"pairs": torch.tensor(keys, dtype=torch.long).reshape(-1, 2),
                    "logps": torch.tensor([self.values[k] for k in keys])}, tmp)
        tmp.replace(self.path)
