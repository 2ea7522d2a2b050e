"""Each loss against values computed by hand (math module, not torch), plus the registry contract."""

import math

import pytest
import torch

from ktoloop.config import ConfigError
from ktoloop.methods import METHODS, OFFLINE
from training.config import TrainConfig
from training.losses import BatchInfo, dpo_loss, ipo_loss, kto_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_one_registry_names_every_method_and_its_loss():
    """The config, the CLI and the trainer derive their methods from ``METHODS``: every offline entry resolves to
    its loss, the online one (PPO) has none and is no ``[training] method``."""
    assert OFFLINE == ("kto", "dpo", "ipo") and list(METHODS) == ["kto", "dpo", "ipo", "ppo"]
    assert [METHODS[m].loss for m in OFFLINE] == [kto_loss, dpo_loss, ipo_loss]
    assert [METHODS[m].paired for m in OFFLINE] == [False, True, True]
    with pytest.raises(AttributeError, match="online"):
        METHODS["ppo"].loss
    with pytest.raises(ConfigError, match="training.method must be one of"):
        TrainConfig(method="ppo")


def test_kto_hand_computed():
    policy = torch.tensor([-10.0, -12.0, -8.0])
    reference = torch.tensor([-11.0, -11.5, -8.0])          # log-ratios r = 1.0, -0.5, 0.0
    info = BatchInfo(lengths=torch.tensor([3, 4, 5]), desirable=torch.tensor([True, False, True]),
                     kl_policy_logps=torch.tensor([-20.0, -21.0, -19.0]),
                     kl_reference_logps=torch.tensor([-20.6, -21.0, -19.3]),  # mismatched log-ratios .6, 0, .3
                     desirable_weight=1.5, undesirable_weight=0.8)
    beta = 0.5
    out = kto_loss(policy, reference, info, beta)
    z = (0.6 + 0.0 + 0.3) / 3
    expected = [1.5 * (1 - sig(beta * (1.0 - z))), 0.8 * (1 - sig(beta * (z - (-0.5)))), 1.5 * (1 - sig(beta * (0 - z)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["kl"] == pytest.approx(z, rel=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.5, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.25])
    assert out.correct.tolist() == [True, True, False]      # 0.0 is below z=0.3 for a desirable completion


def test_kto_z_clamped_at_zero_and_detached():
    policy = torch.tensor([-1.0, -2.0], requires_grad=True)
    info = BatchInfo(lengths=torch.tensor([1, 1]), desirable=torch.tensor([True, False]),
                     kl_policy_logps=torch.tensor([-5.0, -5.0], requires_grad=True),
                     kl_reference_logps=torch.tensor([-4.0, -3.0]))            # mean log-ratio -1.5 -> z = 0
    out = kto_loss(policy, torch.tensor([-1.0, -2.0]), info, 0.1)
    assert out.metrics["kl"] == 0.0
    assert out.losses.tolist() == pytest.approx([0.5, 0.5])
    out.losses.sum().backward()
    assert info.kl_policy_logps.grad is None                                  # z carries no gradient
    assert policy.grad.tolist() == pytest.approx([-0.1 * 0.25, 0.1 * 0.25])   # d/dr (1 - sig(b r)) = -b/4 at 0


def test_dpo_hand_computed():
    # two pairs: chosen first, then rejected
    policy = torch.tensor([-5.0, -7.0, -9.0, -6.0])
    reference = torch.tensor([-6.0, -7.0, -8.0, -6.5])     # chosen r: 1, 0; rejected r: -1, 0.5
    out = dpo_loss(policy, reference, BatchInfo(lengths=torch.tensor([2, 2, 2, 2])), beta=0.2)
    expected = [-math.log(sig(0.2 * (1 - (-1)))), -math.log(sig(0.2 * (0 - 0.5)))]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.2, 0.0])
    assert out.rejected_rewards.tolist() == pytest.approx([-0.2, 0.1])
    assert out.correct.tolist() == [True, False]


def test_ipo_uses_length_averaged_log_ratios():
    policy = torch.tensor([-4.0, -9.0])
    reference = torch.tensor([-6.0, -8.0])                 # chosen r=2 over 4 tokens, rejected r=-1 over 2 tokens
    out = ipo_loss(policy, reference, BatchInfo(lengths=torch.tensor([4.0, 2.0])), beta=0.1)
    h = 2 / 4 - (-1 / 2)
    assert out.losses.tolist() == pytest.approx([(h - 1 / (2 * 0.1)) ** 2], rel=1e-6)
    assert out.correct.tolist() == [True]
