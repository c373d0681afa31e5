"""--loss mse|huber|smooth-l1 and --huber-delta / --huber-schedule (issue 18)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.losses import diffusion_loss, elementwise_loss, huber_deltas
from adapt.train import train
from adapt.train_config import TrainConfig


def _inputs():
    torch.manual_seed(1)
    return torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 300, 900]), torch.randn(3, 77, 32)


def test_mse_is_the_loss_of_before_bit_for_bit_and_huber_differs(tiny_model):
    c = load_components(tiny_model)
    latents, noise, t, hidden = _inputs()
    w = torch.tensor([0.5, 0.25, 0.25])
    with torch.no_grad():
        pred = c.unet(c.noise_scheduler.add_noise(latents, noise, t), t, hidden, return_dict=False)[0]
        before = (F.mse_loss(pred.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3)) * w).sum()
        got = {kind: diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, w, noise, t, loss=kind)
               for kind in ("mse", "huber", "smooth-l1")}
        default = diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, w, noise, t)
    assert torch.equal(got["mse"], before) and torch.equal(default, before)
    d2 = (pred - noise) ** 2
    huber = (2 * 0.1 * (torch.sqrt(d2 + 0.01) - 0.1)).mean(dim=(1, 2, 3))
    assert torch.allclose(got["huber"], (huber * w).sum(), rtol=1e-6)
    assert torch.allclose(got["smooth-l1"], (huber / 0.1 * w).sum(), rtol=1e-6)
    assert got["huber"] < got["mse"]  # |d| ~ 1 >> delta: linear, not quadratic


def test_huber_matches_a_hand_computation_on_a_small_tensor():
    pred, target = torch.tensor([[0.0, 0.05, 1.0, -10.0]]), torch.zeros(1, 4)
    c = 0.1
    hand = [2 * c * (math.sqrt(d * d + c * c) - c) for d in (0.0, 0.05, 1.0, -10.0)]
    assert elementwise_loss(pred, target, "huber", torch.tensor([c]))[0].tolist() == pytest.approx(hand, rel=1e-6)
    assert hand[1] == pytest.approx(0.05 ** 2, rel=0.07) and hand[3] == pytest.approx(2 * c * 10, rel=0.01)
    assert elementwise_loss(pred, target, "smooth-l1", torch.tensor([c]))[0].tolist() == pytest.approx(
        [h / c for h in hand], rel=1e-6)


def test_huber_schedules(tiny_model):
    sched = load_components(tiny_model).noise_scheduler
    T = sched.config.num_train_timesteps
    t = torch.tensor([0, T // 2, T - 1])
    assert huber_deltas(sched, t, 0.1, "constant").tolist() == pytest.approx([0.1] * 3)
    assert huber_deltas(sched, t, 0.1, "exponential").tolist() == pytest.approx([1.0, 0.1 ** 0.5, 0.1 ** ((T - 1) / T)], rel=1e-5)
    snr = huber_deltas(sched, t, 0.1, "snr")
    ab = sched.alphas_cumprod[t]
    assert snr.tolist() == pytest.approx(((1 - 0.1) / (1 + ((1 - ab) / ab) ** 0.5) ** 2 + 0.1).tolist(), rel=1e-5)
    assert snr[0] > 0.9 and snr[1] > snr[2] and snr[2] == pytest.approx(0.1, abs=0.01)
    with pytest.raises(AdaptError, match="unknown loss 'l1'"):
        TrainConfig(loss="l1")
    with pytest.raises(AdaptError, match="--huber-delta must be > 0"):
        TrainConfig(huber_delta=0)


def test_training_with_huber(tiny_model, concept_dir, tmp_path):
    ex = instance_examples(concept_dir, "<sks>", "a photo of {token}")

    def losses(**kw):
        return train(load_components(tiny_model), LoraMethod(LoraConfig()), ex, TrainConfig(steps=2, lr=1e-2, **kw),
                     tmp_path / str(sorted(kw)), resolution=16, progress=False)["losses"]

    base = losses()
    assert losses(loss="mse") == base
    assert losses(loss="huber", huber_schedule="snr") != base
