"""Token-by-token checks of prompts, completions and masks on the real SmolLM2 tokenizer."""

import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ktoloop.snapshot import Manifest, Snapshot, write_files
from training.data import Encoded, collate, encode_completion, encode_snapshot, render_prompt, truncate
from training.logprobs import sequence_logps


@pytest.fixture(scope="module")
def tok(smollm2_tokenizer_dir):
    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def encoded(tok, prompt, completion, max_length=512, max_prompt_length=256):
    return Encoded([render_prompt(tok, prompt)], [encode_completion(tok, completion)], False, max_length,
                   max_prompt_length, [True])


def test_prompt_is_chat_template_user_turn_plus_generation_prompt(tok):
    ids = render_prompt(tok, "Hi there")
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[:2] == ["<|im_start|>", "system"]             # the template's system turn, no extra BOS before it
    assert toks[-8:] == ["Hi", "Ġthere", "<|im_end|>", "Ċ", "<|im_start|>", "ass", "istant", "Ċ"]
    assert toks.count("<|im_start|>") == 3


def test_completion_ends_with_exactly_one_end_of_turn(tok):
    ids = encode_completion(tok, "Sure thing")
    assert tok.convert_ids_to_tokens(ids) == ["Sure", "Ġthing", "<|im_end|>"]
    assert encode_completion(tok, "Sure thing<|im_end|>") == ids          # not doubled
    assert tok.bos_token_id not in ids and ids.count(tok.eos_token_id) == 1


def test_an_answer_cut_off_at_the_serving_limit_gets_no_end_of_turn(tok):
    """The model never produced it: scored, it would let KTO push a disliked cut-off answer down by making
    stopping unlikely."""
    assert tok.convert_ids_to_tokens(encode_completion(tok, "Sure thing", truncated=True)) == ["Sure", "Ġthing"]


def test_a_snapshots_cut_off_answers_are_encoded_without_end_of_turn_in_both_forms(tok, tmp_path):
    rows = [{"prompt": "Hi", "completion": "Hello!", "label": True, "prompt_key": "k", "truncated": False},
            {"prompt": "Hi", "completion": "Well, let me tell you about", "label": False, "prompt_key": "k",
             "truncated": True}]
    write_files(tmp_path, {"train": pl.DataFrame(rows)},
                {"train": pl.DataFrame([{"prompt": "Hi", "chosen": "Hello!", "rejected": "Well, let me tell you about",
                                         "prompt_key": "k"}])})
    snapshot = Snapshot(tmp_path, Manifest("ds-t", "0" * 64, "v1", {}))
    kto = encode_snapshot(snapshot, "train", tok, False, 512, 256)
    ended = {tok.decode(c): c[-1] == tok.eos_token_id for c in kto.completions}
    assert ended == {"Hello!<|im_end|>": True, "Well, let me tell you about": False}
    pairs = encode_snapshot(snapshot, "train", tok, True, 512, 256)
    assert [c[-1] == tok.eos_token_id for c in pairs.completions] == [True, False]  # chosen, then rejected


def test_sequence_and_mask_match_the_chat_template_token_by_token(tok):
    data = encoded(tok, "Hi there", "Sure thing")
    batch = collate(Encoded(data.prompts * 2, [data.completions[0], encode_completion(tok, "A much longer answer here")],
                            False, 512, 256, [True, True]), [(0, 0), (1, 1)], pad_id=tok.pad_token_id)
    row_ids = batch.input_ids[0][batch.attention_mask[0]].tolist()
    full = tok.apply_chat_template([{"role": "user", "content": "Hi there"},
                                    {"role": "assistant", "content": "Sure thing"}], tokenize=False)
    assert tok.decode(row_ids) + "\n" == full                          # template respected, nothing added
    toks = tok.convert_ids_to_tokens(batch.input_ids[0].tolist())
    scored = [t for t, m in zip(toks, batch.completion_mask[0].tolist()) if m]
    assert scored == ["Sure", "Ġthing", "<|im_end|>"]                  # mask covers the completion only
    n_prompt = len(data.prompts[0])
    assert batch.completion_mask[0].tolist() == [False] * n_prompt + [True] * 3 + [False] * (len(toks) - n_prompt - 3)
    assert not batch.attention_mask[0, n_prompt + 3:].any()            # row 0 is padded after its completion
    assert batch.lengths.tolist() == [3, len(encode_completion(tok, "A much longer answer here"))]


def test_truncation_keeps_prompt_end_and_completion_start(tok):
    long_prompt = " ".join(f"word{i}" for i in range(300)) + " final question?"
    long_answer = "Start of the answer. " + " ".join(f"tail{i}" for i in range(300))
    data = encoded(tok, long_prompt, long_answer, max_length=48, max_prompt_length=20)
    prompt, completion = data.tokens((0, 0))
    assert len(prompt) == 20 and len(prompt) + len(completion) == 48
    assert prompt == render_prompt(tok, long_prompt)[-20:]
    assert tok.decode(prompt).endswith("final question?<|im_end|>\n<|im_start|>assistant\n")
    assert completion == encode_completion(tok, long_answer)[:28]
    assert tok.decode(completion).startswith("Start of the answer.")
    assert tok.eos_token_id not in completion                          # a cut completion must not teach stopping
    short = encoded(tok, "Hi", "Ok", max_length=48, max_prompt_length=20)
    assert short.tokens((0, 0)) == (short.prompts[0][-20:], short.completions[0])
    assert truncate([1, 2, 3], [4, 5], 10, 5) == ([1, 2, 3], [4, 5])


def test_sequence_logps_equals_naive_full_logits_sum(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    data = Encoded([render_prompt(tok, "Hi"), render_prompt(tok, "A longer question, please answer")],
                   [encode_completion(tok, "Fine, thanks a lot"), encode_completion(tok, "No")], False, 512, 256,
                   [True, False])
    batch = collate(data, [(0, 0), (1, 1), (0, 1)], pad_id=tok.pad_token_id)
    with torch.no_grad():
        fast = sequence_logps(model, batch)
        logp = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.log_softmax(-1)
    naive = []
    for row in range(3):
        total = 0.0
        for t in range(1, batch.input_ids.shape[1]):
            if batch.completion_mask[row, t]:
                total += logp[row, t - 1, batch.input_ids[row, t]].item()
        naive.append(total)
    assert fast.tolist() == pytest.approx(naive, abs=1e-4)
