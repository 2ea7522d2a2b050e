"""Loading a trained adapter: the merged model the flows evaluate is the policy that was trained."""

import pytest
import torch

from training.config import TrainConfig
from training.data import Encoded, collate, encode_completion, render_prompt
from training.logprobs import sequence_logps
from training.modeling import load_model
from training.runtime import make_trainable, save_model

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = {
    "attention": ATTENTION,
    "mlp": ["gate_proj", "up_proj", "down_proj"],
    "attention+lm_head": ATTENTION + ["lm_head"],  # what the PPO tests train
    "lm_head": ["lm_head"],
    "embed_tokens": ["embed_tokens"],
    "embed_tokens+lm_head": ["embed_tokens", "lm_head"],
}
TOPICS = ["tea", "rivers", "chess", "owls"]


def sequences(tokenizer) -> Encoded:
    prompts = [render_prompt(tokenizer, f"Tell me about {t}.") for t in TOPICS]
    completions = [encode_completion(tokenizer, f"Here is a short note about {t}.") for t in TOPICS]
    return Encoded(prompts, completions, paired=False, max_length=512, max_prompt_length=256)


@pytest.mark.parametrize("targets", TARGETS.values(), ids=TARGETS.keys())
def test_merged_model_scores_like_the_trained_adapter(tiny_model_dir, tmp_path, targets):
    """SmolLM2 (and the tiny model) tie lm_head to embed_tokens: merging a LoRA on one end into the shared
    matrix used to move the other end too (0.88 nats per sequence off on the PPO targets)."""
    config = TrainConfig(lora_target_modules=targets, lora_dropout=0.0)
    model, tokenizer = load_model(tiny_model_dir, device="cpu")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied, like SmolLM2
    batch = collate(sequences(tokenizer), [(i, i) for i in range(len(TOPICS))], tokenizer.pad_token_id)
    with torch.no_grad():
        base_logps = sequence_logps(model, batch)
    policy = make_trainable(model, config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained adapter: B (and embedding A) start at zero, so perturb every LoRA factor
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.3)
    policy.eval()
    with torch.no_grad():
        trained = sequence_logps(policy, batch)
    assert (trained - base_logps).abs().max() > 0.05  # the adapter changes the model: the check below can fail
    save_model(policy, tokenizer, config, tmp_path / "adapter")

    merged, _ = load_model(tiny_model_dir, adapter_dir=tmp_path / "adapter", device="cpu")
    with torch.no_grad():
        merged_logps = sequence_logps(merged, batch)
    assert torch.allclose(merged_logps, trained, atol=1e-4, rtol=1e-6)
