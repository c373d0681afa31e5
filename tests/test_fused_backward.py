"""--fused-backward (optim.StepInBackward): each weight steps inside backward as soon as its gradient is
complete, and that gradient is freed, so a full fine-tune never holds all gradients at once. Without
clipping it trains exactly as the usual optimizer step; clipping is per weight tensor; checkpoints resume
exactly, in either mode; auto is on only for full-UNet-sized runs where nothing needs all gradients."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.estimate import FUSED_BACKWARD_MIN_PARAMS, choose_fused_backward, estimate
from adapt.methods.full import FullMethod
from adapt.models import load_components
from adapt.optim import StepInBackward
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

BIG = FUSED_BACKWARD_MIN_PARAMS


def toy(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def sgd(groups):
    return torch.optim.SGD(groups, lr=1.0)


def loss_of(model, seed: int = 1):
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))
    return (model(x) ** 2).sum() * 10  # large gradients, so that clipping bites


def test_each_gradient_is_freed_as_soon_as_its_weight_steps():
    model = toy()
    params = list(model.parameters())
    opt = StepInBackward([{"params": params, "lr": 1.0}], sgd, max_norm=0.0)
    held = []  # how many gradients exist while each weight steps
    for inner in opt.inner:
        step = inner.step
        inner.step = lambda step=step: (held.append(sum(p.grad is not None for p in params)), step())[1]
    loss_of(model).backward()
    assert len(held) == len(params) and max(held) == 1  # the usual step holds all 6 at once
    assert all(p.grad is None for p in params)


def test_the_step_equals_sgd_on_the_per_tensor_clipped_gradient():
    model, ref = toy(), toy()
    loss_of(ref).backward()
    grads = [p.grad.clone() for p in ref.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    opt = StepInBackward([{"params": list(model.parameters()), "lr": 0.5}], sgd, max_norm=0.3)
    loss_of(model).backward()
    for p, b, g in zip(model.parameters(), before, grads):
        clipped = g * min(1.0, 0.3 / (g.norm().item() + 1e-6))
        assert torch.allclose(b - p.detach(), 0.5 * clipped, atol=1e-6)  # the group's lr, each tensor clipped alone
    assert max(g.norm().item() for g in grads) > 0.3  # clipping did bite
    opt.close()
    loss_of(model).backward()  # no hooks now: the gradient stays, nothing steps
    assert all(p.grad is not None for p in model.parameters())


def test_an_unarmed_backward_accumulates_for_the_next_or_for_step():
    model, ref = toy(), toy()
    (loss_of(ref, 1) + loss_of(ref, 2)).backward()
    ref_opt = sgd(list(ref.parameters()))
    ref_opt.step()
    opt = StepInBackward([{"params": list(model.parameters()), "lr": 1.0}], sgd, max_norm=0.0)
    opt.armed = False
    loss_of(model, 1).backward()
    assert all(p.grad is not None for p in model.parameters())  # kept, nothing stepped
    opt.armed = True
    loss_of(model, 2).backward()  # steps on the sum of both
    for p, q in zip(model.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)
    other = toy()
    opt2 = StepInBackward([{"params": list(other.parameters()), "lr": 1.0}], sgd, max_norm=0.0)
    opt2.armed = False
    (loss_of(other, 1) + loss_of(other, 2)).backward()
    opt2.step()  # what backward did not step, step() does
    for p, q in zip(other.parameters(), ref.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_auto_is_on_for_full_fine_tunes_where_nothing_needs_every_gradient():
    cfg = TrainConfig()
    assert choose_fused_backward(cfg, BIG - 1, 1) == (False, None)  # a LoRA, the bundled base's UNet: nothing to gain
    on, why = choose_fused_backward(cfg, 860_000_000, 1)
    assert on and "3.2 GiB" in why and "clipping is per weight tensor" in why
    for cfg, n_proc, reason in ((TrainConfig(optimizer="prodigy"), 1, "--optimizer prodigy"),
                                (TrainConfig(mixed_precision="fp16"), 1, "fp16"),
                                (TrainConfig(grad_accum=2), 1, "gradient accumulation"),
                                (TrainConfig(), 2, "data-parallel")):
        on, why = choose_fused_backward(cfg, BIG, n_proc)
        assert not on and reason in why
        with pytest.raises(AdaptError, match="--fused-backward on cannot work here: .*use --fused-backward off"):
            choose_fused_backward(TrainConfig(**{**vars(cfg), "fused_backward": "on"}), 10, n_proc)
    assert choose_fused_backward(TrainConfig(fused_backward="auto"), BIG, 1, precision="fp16")[0] is False  # auto settled
    assert choose_fused_backward(TrainConfig(fused_backward="on"), 10, 1)[0]
    assert choose_fused_backward(TrainConfig(fused_backward="off"), BIG, 1) == (False, None)


def test_the_estimate_holds_one_gradient_when_fused(tiny_model):
    full = estimate(tiny_model, kind="full", resolution=64, batch=1)
    fused = estimate(tiny_model, kind="full", resolution=64, batch=1, fused=lambda n: True)
    assert fused.parts["gradients"] < full.parts["gradients"] / 10 and fused.peak_bytes < full.peak_bytes
    assert estimate(tiny_model, kind="full", resolution=64, batch=1, fused=lambda n: False).parts == full.parts


def _full(tiny_model, concept_dir, out, **cfg):
    c = load_components(tiny_model)
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token} dog")
    result = train(c, FullMethod(), examples, TrainConfig(**{"steps": 3, "lr": 1e-3, "max_grad_norm": 0.0, **cfg}), out,
                   resolution=16, progress=False)
    return c, result


def test_a_full_fine_tune_trains_bit_identically_and_leaves_no_hooks(tiny_model, concept_dir, tmp_path, caplog):
    plain, a = _full(tiny_model, concept_dir, tmp_path / "a", fused_backward="off")
    with caplog.at_level(logging.INFO, logger="adapt"):
        fused, b = _full(tiny_model, concept_dir, tmp_path / "b", fused_backward="on")
    assert "fused backward: on" in caplog.text
    assert a["losses"] == b["losses"]
    p, f = dict(plain.unet.named_parameters()), dict(fused.unet.named_parameters())
    assert all(torch.equal(p[k], f[k]) for k in p)
    start = dict(load_components(tiny_model).unet.named_parameters())
    assert any(not torch.equal(start[k], f[k]) for k in f)  # it did train
    clipped, _ = _full(tiny_model, concept_dir, tmp_path / "c", fused_backward="on", max_grad_norm=1e-3)
    assert any(not torch.equal(f[k], c) for k, c in clipped.unet.named_parameters())  # per-tensor clipping changes it
    before = {k: v.detach().clone() for k, v in f.items()}
    fused.unet(torch.randn(1, 4, 8, 8), 1, torch.randn(1, 77, 32)).sample.sum().backward()
    assert all(torch.equal(before[k], v) for k, v in fused.unet.named_parameters())  # the run's hooks are gone


def test_checkpoints_resume_exactly_in_either_mode(tiny_model, concept_dir, tmp_path):
    """4 steps with a checkpoint at 2: resuming it (fused or not, whichever wrote it) ends where one run does."""
    _, whole = _full(tiny_model, concept_dir, tmp_path / "whole", steps=4, fused_backward="off")
    _, fused = _full(tiny_model, concept_dir, tmp_path / "fused", steps=4, fused_backward="on", checkpoint_every=2)
    end = dict(load_components(str(tmp_path / "whole")).unet.named_parameters())
    for mode in ("on", "off"):
        out = tmp_path / f"resumed-{mode}"
        shutil.copytree(tmp_path / "fused" / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
        _, resumed = _full(tiny_model, concept_dir, out, steps=4, fused_backward=mode, checkpoint_every=2, resume="latest")
        assert resumed["losses"] == whole["losses"] == fused["losses"]
        got = dict(load_components(str(out)).unet.named_parameters())
        assert all(torch.equal(end[k], got[k]) for k in end), mode


def test_cli_fused_backward_errors(tiny_model, concept_dir, tmp_path):
    common = ["--images", concept_dir, "--token", "sks", "--class-word", "dog", "--model", tiny_model, "--steps", "1",
              "--no-prior-preservation", "--output", tmp_path / "x"]
    code, log = run("dreambooth", *common, "--fused-backward", "maybe")
    assert code == 2 and "unknown --fused-backward value 'maybe'; choose one of: auto, on, off" in log
    code, log = run("dreambooth", *common, "--fused-backward", "on", "--grad-accum", "2")
    assert code == 2 and "--fused-backward on cannot work here: gradient accumulation" in log
    assert not (tmp_path / "x").exists()  # refused before the run folder or a model
