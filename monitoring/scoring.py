"""Log-likelihood of continuations given contexts, batched: the one model-facing primitive of the harness.

Every benchmark reduces to "log P(continuation | context)" (plus whether greedy decoding would have produced
the continuation), as in lm-evaluation-harness. Requests are sorted by length so a padded batch wastes little,
and only continuation positions go through the LM head, which keeps memory flat on long contexts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class Request:
    """Token ids: score ``continuation`` after ``context`` (context is never empty: use a BOS/EOS prefix)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float
    """Summed log-probability of the continuation tokens."""
    greedy: bool
    """Whether every continuation token is the argmax at its position."""
    tokens: int


def encode_pair(tokenizer, context: str, continuation: str) -> Request:
    """Tokenise like the harness: the pair is encoded jointly, so the split point respects merges.

    Trailing spaces of the context move to the continuation (``"Answer: " + "x"`` == ``"Answer:" + " x"``).
    """
    stripped = context.rstrip(" ")
    continuation = context[len(stripped):] + continuation
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    if not ctx:
        ctx = [prefix_token(tokenizer)]
        whole = ctx + whole
    return Request(tuple(ctx), tuple(whole[len(ctx):]))


def prefix_token(tokenizer) -> int:
    """The token an empty context is conditioned on (lm-eval uses EOT)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path} has neither BOS nor EOS; cannot score an empty context")
    return int(token)


def _batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Greedy batches over requests sorted longest first; a batch's padded size stays under ``batch_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = lengths[current[0]] if current else lengths[index]
        if current and longest * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


@torch.inference_mode()
def loglikelihood(model, requests: list[Request], *, batch_tokens: int = 8192, max_length: int = 2048,
                  pad_id: int = 0, desc: str = "scoring", progress: bool = True,
                  on_batch: Callable[[int], None] | None = None) -> list[Score]:
    """Score every request; results come back in request order. ``on_batch(n)`` after each batch of n."""
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    inputs: list[list[int]] = []
    for req in requests:
        if not req.context or not req.continuation:
            raise ValueError("a request needs a non-empty context and continuation")
        # the model sees context + continuation minus the last token, cut from the left to max_length
        inputs.append(list(req.context + req.continuation)[-(max_length + 1):][:-1])
    lengths = [len(x) for x in inputs]
    order = sorted(range(len(requests)), key=lambda i: -lengths[i])
    results: list[Score | None] = [None] * len(requests)
    for batch in tqdm(_batches(order, lengths, batch_tokens), desc=desc, disable=not progress, unit="batch"):
        width = lengths[batch[0]]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, index in enumerate(batch):
            ids[row, : lengths[index]] = torch.tensor(inputs[index])
            mask[row, : lengths[index]] = 1
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        # rows and positions whose next token is a continuation token (right padding keeps them at the end)
        rows, cols, targets, owners = [], [], [], []
        for row, index in enumerate(batch):
            cont = requests[index].continuation[-lengths[index]:]
            start = lengths[index] - len(cont)
            rows += [row] * len(cont)
            cols += range(start, lengths[index])
            targets += cont
            owners += [index] * len(cont)
        logits = head(hidden[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]).float()
        logprobs = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(targets, device=device)
        token_lp = logprobs.gather(1, target[:, None]).squeeze(1).cpu()
        hits = (logprobs.argmax(dim=-1) == target).cpu()
        offset = 0
        for index in batch:
            count = min(len(requests[index].continuation), lengths[index])
            results[index] = Score(float(token_lp[offset:offset + count].sum()), bool(hits[offset:offset + count].all()),
                                   count)
            offset += count
        assert offset == len(owners)
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


def rolling_requests(tokens: list[int], prefix: int, max_length: int) -> list[Request]:
    """Split a document into disjoint prediction windows for perplexity, each with as much context as fits.

    Every token is predicted exactly once (the first from ``prefix``), as lm-eval's rolling windows do.
    """
    seq = [prefix] + list(tokens)
    requests = []
    for start in range(1, len(seq), max_length):
        end = min(start + max_length, len(seq))
        context_start = max(0, end - 1 - max_length)
        requests.append(Request(tuple(seq[context_start:start]), tuple(seq[start:end])))
    return requests
