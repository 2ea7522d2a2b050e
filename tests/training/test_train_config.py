"""TrainConfig: validated in __post_init__, loaded from [training], errors name the field."""

import dataclasses

import pytest

from ktoloop.config import ConfigError, load_settings, load_section
from training.config import TrainConfig


@pytest.mark.parametrize("field,value,match", [
    ("method", "orpo", "training.method"), ("beta", 0.0, "training.beta"), ("batch_size", 0, "training.batch_size"),
    ("lora_dropout", 1.0, "training.lora_dropout"), ("device", "tpu", "training.device"),
    ("max_prompt_length", 600, "max_prompt_length"), ("warmup_steps", -1, "training.warmup_steps"),
    ("lora_layers", -1, "training.lora_layers"),
])
def test_invalid_values_named(field, value, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**{field: value})


def test_epochs_or_steps_required_and_replace_revalidates():
    with pytest.raises(ConfigError, match="epochs and training.max_steps"):
        TrainConfig(epochs=0)
    with pytest.raises(ConfigError, match="training.beta"):
        dataclasses.replace(TrainConfig(), beta=-1.0)


def test_loaded_from_toml_section(tmp_path):
    cfg = tmp_path / "k.toml"
    cfg.write_text('[training]\nmethod = "dpo"\nbeta = 0.3\nlora_target_modules = ["q_proj"]\n')
    config = load_section(load_settings(cfg), "training", TrainConfig)
    assert (config.method, config.beta, config.lora_target_modules) == ("dpo", 0.3, ("q_proj",))
    assert config.fingerprint() != TrainConfig().fingerprint()
    cfg.write_text('[training]\nbeta_typo = 0.3\n')
    with pytest.raises(ConfigError, match=r"beta_typo.*\[training\]"):
        load_section(load_settings(cfg), "training", TrainConfig)


def test_lora_layers_adapts_only_the_top_layers(tiny_model_dir):
    from training.modeling import load_model
    from training.runtime import make_trainable

    model, _ = load_model(tiny_model_dir, device="cpu")
    adapted = make_trainable(model, TrainConfig(lora_layers=1))
    trained = {name.split(".layers.")[1].split(".")[0] for name, p in adapted.named_parameters() if p.requires_grad}
    assert trained == {"1"}  # the tiny model has layers 0 and 1
    model, _ = load_model(tiny_model_dir, device="cpu")
    with pytest.raises(ConfigError, match="lora_layers = 3 but the model has 2 layers"):
        make_trainable(model, TrainConfig(lora_layers=3))


@pytest.mark.parametrize("section", ["training", "reward", "ppo"])
def test_every_trainer_checks_its_lora_fields_by_section_name(section):
    from training.ppo import PPOConfig
    from training.reward import RewardConfig

    cls = {"training": TrainConfig, "reward": RewardConfig, "ppo": PPOConfig}[section]
    for field, value in (("lora_r", 0), ("lora_alpha", -1), ("lora_dropout", 1.0), ("lora_target_modules", []),
                         ("lora_layers", -1)):
        with pytest.raises(ConfigError, match=rf"{section}\.{field}"):
            cls(**{field: value})


def test_added_fields_at_their_defaults_keep_the_fingerprint():
    """Model ids name their config's fingerprint: a field added later must not rename every existing model."""
    assert TrainConfig().fingerprint() == "4a2c90bad1"  # the default [training] before kl_pairs/group_by_length
    assert TrainConfig(kl_pairs=2).fingerprint() != TrainConfig().fingerprint()
    assert TrainConfig(group_by_length=True).fingerprint() != TrainConfig().fingerprint()
    with pytest.raises(ConfigError, match=r"training.kl_pairs must be <= training.batch_size \(8\)"):
        TrainConfig(kl_pairs=9)
