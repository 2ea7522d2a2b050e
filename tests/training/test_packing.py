"""Packed scoring (several answers to one prompt in one row) gives each sequence the log-prob it has alone."""

import pytest
import torch

from test_shared_trunk import adapted
from training import packing
from training.data import Encoded, collate, encode_completion, render_prompt
from training.logprobs import compute_logps, compute_policy_and_reference, sequence_logps, shared_trunk
from training.modeling import load_model


def paired(tokenizer, max_length: int = 512) -> Encoded:
    """Three prompts, a chosen and a rejected answer to each (answers of different lengths)."""
    prompts = ["Hi", "A longer question, please answer it", "What is the capital of France?"]
    chosen = ["Fine, thanks a lot", "Yes", "Paris is the capital of France."]
    rejected = ["No", "I would rather not answer that question at all", "Lyon"]
    return Encoded([render_prompt(tokenizer, p) for p in prompts],
                   [encode_completion(tokenizer, t) for t in chosen + rejected], True, max_length, 256)


def alone(model, data: Encoded, pairs) -> torch.Tensor:
    """Each sequence in a batch of its own: no packing, no padding."""
    with torch.no_grad():
        return torch.cat([sequence_logps(model, collate(data, [pair], 0)) for pair in pairs])


def test_a_pairs_answers_share_a_row_and_score_as_they_do_alone(tiny_reference):
    model, tokenizer = load_model(tiny_reference.path, device="cpu")
    data = paired(tokenizer)
    pairs = data.sequences(list(range(data.n)))
    rows = packing.plan_rows([data.tokens(p) for p in pairs], max_tokens=2 * data.max_length)
    assert [len(row.continuations) for row in rows] == [2, 2, 2]  # one row per prompt, not per answer

    packed = compute_logps(model, data, pairs, tokenizer.pad_token_id, torch.device("cpu"), batch_size=4)
    assert packed.tolist() == pytest.approx(alone(model, data, pairs).tolist(), abs=1e-4)


def test_the_shared_trunk_pass_over_packed_rows_equals_policy_and_reference_alone(tiny_reference):
    policy_model, tokenizer = adapted(tiny_reference.path, lora_layers=1)
    reference_model, _ = load_model(tiny_reference.path, device="cpu")
    data = paired(tokenizer)
    pairs = data.sequences(list(range(data.n)))
    policy, reference = compute_policy_and_reference(policy_model, data, pairs, tokenizer.pad_token_id,
                                                     torch.device("cpu"), 6, shared_trunk(policy_model))
    assert policy.tolist() == pytest.approx(alone(policy_model, data, pairs).tolist(), abs=1e-4)
    assert reference.tolist() == pytest.approx(alone(reference_model, data, pairs).tolist(), abs=1e-4)
    assert (policy - reference).abs().max() > 0.1  # the adapter matters, so the checks above could fail


def test_a_row_that_would_outgrow_max_tokens_starts_another():
    sequences = [((1, 2, 3), (4, 5)), ((1, 2, 3), (6,)), ((1, 2, 3), (7, 8, 9)), ((9,), (1,)), ((1, 2, 3), (4,))]
    rows = packing.plan_rows(sequences, max_tokens=6)
    assert [(row.context, [i for i, _ in row.continuations]) for row in rows] == [
        ((1, 2, 3), [0, 1]), ((1, 2, 3), [2, 4]), ((9,), [3])]
    assert max(row.length for row in rows) <= 6
    with pytest.raises(ValueError, match="sequence 0 has an empty context"):
        packing.plan_rows([((), (1,))], max_tokens=8)


def test_a_continuation_sees_its_context_and_itself_not_its_siblings():
    row = packing.Row((10, 11), ((0, (20, 21)), (1, (30, 31, 32))))
    batch = packing.collate_rows([row], pad_id=0)
    assert batch.input_ids[0].tolist() == [10, 11, 20, 21, 30, 31]  # the row's last token predicts nothing
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3]
    sees = batch.attention_mask[0, 0].int().tolist()
    assert sees[3] == [1, 1, 1, 1, 0, 0]   # second token of the first answer
    assert sees[5] == [1, 1, 0, 0, 1, 1]   # second token of the second answer: not the first answer
    rows, columns, targets, owners = batch.scored
    assert list(zip(columns.tolist(), targets.tolist(), owners.tolist())) == [
        (1, 20, 0), (2, 21, 0), (1, 30, 1), (4, 31, 1), (5, 32, 1)]
