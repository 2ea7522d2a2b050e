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


def generations_config(tmp_path, broker, monkeypatch, after: str = ""):
    """A ktoloop.toml for a loop over generations on the test broker (its own topic and group), set as
    ``$KTOLOOP_CONFIG``; ``after``: sections to append. Returns its path."""
    import uuid

    name = uuid.uuid4().hex[:8]
    config = tmp_path / "ktoloop.toml"
    config.write_text(f"""
home = "{tmp_path / 'home'}"
[kafka]
bootstrap_servers = "{broker.address}"
topic = "fb-{name}"
group_id = "g-{name}"
partitions = 1
[dataset]
holdout_fraction = 0.2
[dataset.gates]
min_examples = 100
""" + tiny_loop_sections(after=after))
    monkeypatch.setenv("KTOLOOP_CONFIG", str(config))
    monkeypatch.delenv("KTOLOOP_HOME", raising=False)
    return config
