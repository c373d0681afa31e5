"""Training options: min-SNR and noise offset, validation grids, report.md and tensorboard,
and multi-process data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from adapt.config import LoraConfig
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import diffusion_loss, train
from adapt.train_config import TrainConfig
from conftest import run

LORA = "pytorch_lora_weights.safetensors"


# --- loss options ---------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny_model", "tiny_v_model"])
def test_min_snr_weighting_equals_hand_computation(model, request):
    c = load_components(request.getfixturevalue(model))
    torch.manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([5, 300, 900])
    hidden = torch.randn(3, 77, 32)
    w = torch.tensor([0.5, 0.25, 0.25])
    with torch.no_grad():
        got = diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, w, noise, t, snr_gamma=5.0)
        plain = [diffusion_loss(c.unet, c.noise_scheduler, latents[i:i + 1], hidden[i:i + 1], torch.ones(1), noise[i:i + 1],
                                t[i:i + 1]) for i in range(3)]
    ab = c.noise_scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    v = c.noise_scheduler.config.prediction_type == "v_prediction"
    factor = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if v else snr)
    expected = sum(w[i] * factor[i] * plain[i] for i in range(3))
    assert torch.allclose(got, expected, rtol=1e-5)
    assert factor[0] < 0.1 and factor[2] == pytest.approx(1.0 if not v else float(snr[2] / (snr[2] + 1)), rel=1e-5)


def test_noise_offset_and_snr_change_training_only_when_asked(tiny_model, concept_dir, tmp_path):
    from adapt.data import instance_examples

    ex = instance_examples(concept_dir, "<sks>", "a photo of {token}")

    def losses(**kw):
        return train(load_components(tiny_model), LoraMethod(LoraConfig()), ex, TrainConfig(steps=3, lr=1e-2, **kw),
                     tmp_path / str(len(kw)) / str(sorted(kw)), resolution=16, progress=False)["losses"]

    base = losses()
    assert losses(noise_offset=0.0) == base
    assert losses(noise_offset=0.1) != base
    assert losses(snr_gamma=0.5) != base  # a small gamma reweights most timesteps


# --- validation samples, report, tensorboard ---------------------------------------------------

def test_validation_grids_report_and_tensorboard(tiny_model, concept_dir, tmp_path):
    from adapt.infer import generate, load_pipeline

    out = tmp_path / "run"
    code, log = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out,
                    "--steps", "4", "--lr", "1e-2", "--validation-prompt", "a photo of <sks>", "--validation-prompt", "a dog",
                    "--validation-every", "2", "--validation-steps", "3", "--log-with", "tensorboard")
    assert code == 0, log
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final.png", "step-000002.png"]
    report = (out / "report.md").read_text()
    assert "validation/final.png" in report and "loss.png" in report and '"method": "lora"' in report
    assert list((out / "logs").rglob("events.out.tfevents*"))

    # the final grid is what the inference module renders from the saved LoRA (seed = --seed)
    pipe = load_pipeline(str(tiny_model), "dpm++2m-karras", loras=[(str(out / LORA), 1.0)])
    images = generate(pipe, ["a photo of <sks>", "a dog"], [0, 0], steps=3)
    grid = np.asarray(Image.open(out / "validation" / "final.png"), dtype=int)
    ours = np.concatenate([np.asarray(i, dtype=int) for i in images], axis=1)
    assert np.abs(grid[:16, :32] - ours).max() <= 2


# --- multi-process -----------------------------------------------------------------------------

def test_two_processes_equal_one_process_with_the_same_global_batch(tiny_model, concept_dir, tmp_path):
    from safetensors.torch import load_file

    def cmd(out, *extra):
        return [sys.executable, "-m", "adapt", "lora", "--images", str(concept_dir), "--token", "<sks>", "--model",
                str(tiny_model), "--output", str(out), "--steps", "5", "--lr", "1e-2", "--random-flip",
                "--caption-dropout", "0.3", "--validation-split", "0.34", "--validation-every", "2", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(cmd(tmp_path / "one", "--batch-size", "2"), capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(cmd(tmp_path / "two", "--batch-size", "1", "--num-processes", "2"), capture_output=True, text=True,
                         env=env, timeout=600)  # a hung collective fails the test instead of the whole run
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = load_file(str(tmp_path / "one" / LORA)), load_file(str(tmp_path / "two" / LORA))
    # Equal up to the order of the gradient all-reduce, which Adam's normalisation can amplify to
    # ~1e-4 after 5 steps at lr 1e-2 (a single process with batch 1 differs by ~7e-2).
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 2e-3
    la = [json.loads(r)["loss"] for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(r)["loss"] for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(lb) == 5 and np.allclose(la, lb, rtol=1e-5)  # one line per step: only the main process writes
    # the validation loss: each process scores its share of the held-out draws, unwrapped from DDP, then summed
    va = [json.loads(r).get("val_loss") for r in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    vb = [json.loads(r).get("val_loss") for r in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [i + 1 for i, v in enumerate(va) if v is not None] == [i + 1 for i, v in enumerate(vb) if v is not None] == [2, 4, 5]
    assert np.allclose([v for v in va if v is not None], [v for v in vb if v is not None], rtol=1e-5)
    # the same files (the kohya file is named after its run folder)
    assert sorted(p.name.replace("two", "RUN") for p in (tmp_path / "two").iterdir()) == \
        sorted(p.name.replace("one", "RUN") for p in (tmp_path / "one").iterdir())
    assert json.loads((tmp_path / "two" / "recipe.json").read_text())["train"]["num_processes"] == 2
