"""Text to tensors: chat-templated prompts, completions closed by the end-of-turn token, completion-only masks.

A sequence is ``prompt_ids + completion_ids``: the prompt is the chat template's user turn plus generation
prompt (its own special tokens, no extra BOS); the completion is the response followed by exactly one
end-of-turn token (the tokenizer's eos, ``<|im_end|>`` for SmolLM2), unless the serving stack cut the answer
off at its token limit (``truncated``): the model never produced that token, and scoring it hands the loss a
shortcut (a disliked cut-off answer is pushed down most cheaply by making its end-of-turn token unlikely, which
teaches the model never to stop; in the generations simulation this kept the thumbs-up rate flat).
Only completion tokens are scored.
Too long: the prompt keeps its last ``max_prompt_length`` tokens, then the completion keeps its first tokens.

Sequences are addressed as (prompt row, completion row) so KTO's mismatched pairs and DPO's chosen/rejected
share one representation (and one reference log-prob cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ktoloop.errors import KtoLoopError
from ktoloop.snapshot import Snapshot

Pair = tuple[int, int]  # (prompt row, completion row)


def render_prompt(tokenizer, prompt: str) -> list[int]:
    """The user turn plus the assistant generation prompt, as the model saw it at serving time."""
    if not getattr(tokenizer, "chat_template", None):
        raise KtoLoopError(f"tokenizer {tokenizer.name_or_path} has no chat template; pin a chat model")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # the template already holds any BOS


def encode_completion(tokenizer, response: str, truncated: bool = False) -> list[int]:
    """The response's tokens plus one end-of-turn token (not doubled if the text already ends with it), or
    none when the answer was ``truncated`` (cut off at the serving token limit)."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(response, add_special_tokens=False).input_ids
    return ids if truncated or (ids and ids[-1] == eos) else ids + [eos]


def truncate(prompt: list[int], completion: list[int], max_length: int,
             max_prompt_length: int) -> tuple[list[int], list[int]]:
    """Keep the end of the prompt (the question and the generation prompt) and the start of the completion."""
    prompt = prompt[-max_prompt_length:]
    return prompt, completion[: max_length - len(prompt)]


@dataclass(frozen=True)
class Encoded:
    """One split, tokenised. Unpaired (KTO): completion i answers prompt i. Paired (DPO/IPO): completion i is
    the chosen and completion n+i the rejected answer to prompt i."""

    prompts: list[list[int]]
    completions: list[list[int]]
    paired: bool
    max_length: int
    max_prompt_length: int
    desirable: list[bool] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.prompts)

    def sequences(self, rows: list[int]) -> list[Pair]:
        """The sequences a batch of examples trains on (paired: all chosen, then all rejected)."""
        if self.paired:
            return [(i, i) for i in rows] + [(i, self.n + i) for i in rows]
        return [(i, i) for i in rows]

    def tokens(self, pair: Pair) -> tuple[list[int], list[int]]:
        return truncate(self.prompts[pair[0]], self.completions[pair[1]], self.max_length, self.max_prompt_length)


def mismatched(rows: list[int]) -> list[Pair]:
    """KTO's KL-estimate sequences: prompt i with the completion of the next example in the batch."""
    return [(rows[j], rows[(j + 1) % len(rows)]) for j in range(len(rows))]


def encode_snapshot(snapshot: Snapshot, split: str, tokenizer, paired: bool, max_length: int,
                    max_prompt_length: int) -> Encoded:
    """Tokenise a snapshot split (``pairs_<split>`` when paired, else ``kto_<split>``)."""
    frame = snapshot.pairs(split) if paired else snapshot.kto(split)
    if frame.height == 0:
        raise KtoLoopError(f"snapshot {snapshot.manifest.snapshot_id}: {'pairs' if paired else 'kto'}_{split}"
                           f".parquet is empty")
    prompts = [render_prompt(tokenizer, p) for p in frame["prompt"].to_list()]
    texts, cut = completion_texts(frame, paired)
    completions = [encode_completion(tokenizer, t, c) for t, c in zip(texts, cut)]
    desirable = [] if paired else [bool(x) for x in frame["label"].to_list()]
    return Encoded(prompts, completions, paired, max_length, max_prompt_length, desirable)


def completion_texts(frame, paired: bool) -> tuple[list[str], list[bool]]:
    """The completions of a ``Snapshot.kto`` or ``Snapshot.pairs`` frame in ``Encoded`` order (paired: all
    chosen, then all rejected), each with whether it was cut off at the serving token limit."""
    if paired:
        return (frame["chosen"].to_list() + frame["rejected"].to_list(),
                frame["chosen_truncated"].to_list() + frame["rejected_truncated"].to_list())
    return frame["completion"].to_list(), frame["truncated"].to_list()


@dataclass
class Batch:
    input_ids: torch.Tensor       # (B, L) right-padded
    attention_mask: torch.Tensor  # (B, L)
    completion_mask: torch.Tensor  # (B, L) True where the token is a completion token (scored)

    position_ids = None  # 0..L-1 (a ``training.packing.PackedBatch`` numbers its own)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    @property
    def size(self) -> int:
        return len(self.input_ids)

    @property
    def scored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(row, column, target, owner) per completion token, as ``PackedBatch.scored``: position t predicts
        token t+1, and a row is one sequence."""
        mask = self.completion_mask[:, 1:]
        rows, columns = mask.nonzero(as_tuple=True)
        return rows, columns, self.input_ids[:, 1:][mask], rows


def collate(encoded: Encoded, pairs: list[Pair], pad_id: int, device: torch.device | str = "cpu") -> Batch:
    seqs = [encoded.tokens(p) for p in pairs]
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.bool)
    scored = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (p, c) in enumerate(seqs):
        ids[row, : len(p) + len(c)] = torch.tensor(p + c)
        attention[row, : len(p) + len(c)] = True
        scored[row, len(p): len(p) + len(c)] = True
    return Batch(ids.to(device), attention.to(device), scored.to(device))
