"""Log-likelihood of continuations given contexts, batched: the one model-facing primitive of the harness.

Every benchmark reduces to "log P(continuation | context)" (plus whether greedy decoding would have produced
the continuation), as in lm-evaluation-harness. Requests are sorted by length so a padded batch wastes little,
requests with one context share a row (``training.packing``), and only continuation positions go through the
LM head, which keeps memory flat on long contexts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from monitoring.config import MonitorConfig
from training import packing


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


def _window(request: Request, max_length: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(context, continuation) as the model sees them: cut from the left to ``max_length`` + 1 tokens (the last
    is only predicted); a continuation longer than that is scored on its last tokens."""
    if not request.context or not request.continuation:
        raise ValueError("a request needs a non-empty context and continuation")
    tokens = (request.context + request.continuation)[-(max_length + 1):]
    scored = min(len(request.continuation), len(tokens) - 1)
    return tokens[:-scored], tokens[-scored:]


@torch.inference_mode()
def loglikelihood(model, requests: list[Request], *, batch_tokens: int = MonitorConfig.batch_tokens,
                  max_length: int = MonitorConfig.max_length, pad_id: int = 0, desc: str = "scoring",
                  progress: bool = True, on_batch: Callable[[int], None] | None = None,
                  share_contexts: bool = True) -> list[Score]:
    """Score every request; results come back in request order. Requests with the same context share a row
    (``training.packing``), so a multiple-choice item's question is computed once for all its options
    (``share_contexts=False``: a row each, the benchmark's baseline); a batch's padded size stays under
    ``batch_tokens``. ``on_batch(n)`` after each batch of n requests."""
    device = next(model.parameters()).device
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    windows = [_window(r, max_length) for r in requests]
    rows = packing.plan_rows(windows, max_tokens=max_length if share_contexts else 0)
    results: list[Score | None] = [None] * len(requests)
    chunks = packing.batches(rows, max_tokens=batch_tokens)
    for chunk in tqdm(chunks, desc=desc, disable=not progress, unit="batch"):
        batch = packing.collate_rows(chunk, pad_id, device)
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         position_ids=batch.position_ids).last_hidden_state
        row_ids, columns, targets, owners = batch.scored
        logprobs = torch.log_softmax(head(hidden[row_ids, columns]).float(), dim=-1)
        token_lp = logprobs.gather(1, targets[:, None]).squeeze(1)
        misses = (logprobs.argmax(dim=-1) != targets).float()
        sums = torch.zeros(batch.size, device=device).index_add(0, owners, token_lp).cpu()
        missed = torch.zeros(batch.size, device=device).index_add(0, owners, misses).cpu()
        counts = torch.bincount(owners, minlength=batch.size).cpu()
        for k, index in enumerate(batch.sequences):
            results[index] = Score(float(sums[k]), bool(missed[k] == 0), int(counts[k]))
        if on_batch is not None:
            on_batch(batch.size)
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
