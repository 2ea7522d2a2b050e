"""Helpers shared by the flow tests."""

from __future__ import annotations


def tiny_loop_sections(lr: float = 2e-3, training: str = "", after: str = "") -> str:
    """TOML for ``[training]`` and ``[monitoring]`` that train and check a tiny model in seconds; ``training``:
    extra ``[training]`` lines, ``after``: sections to append."""
    return f"""
[training]
lr = {lr}
max_steps = 12
batch_size = 8
max_length = 64
max_prompt_length = 32
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
{training}
[monitoring]
quick_sizes = {{ wikitext2 = 3, arc_easy = 20 }}
max_length = 128
batch_tokens = 2048
{after}"""
