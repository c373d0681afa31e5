"""The inference module: LoRA files load in plain diffusers with the same images; LoRA weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adapt.checks import parse_weighted
from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.infer import generate, load_pipeline
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig


@pytest.fixture(scope="module")
def lora_file(tiny_model, concept_dir, tmp_path_factory):
    """A LoRA with alpha != rank (so a loader that ignores alpha would scale it wrong), trained
    hard enough to change the images."""
    out = tmp_path_factory.mktemp("lora")
    cfg = TrainConfig(steps=30, lr=2e-2)
    train(load_components(tiny_model), LoraMethod(LoraConfig(rank=4, alpha=8, targets="q,k,v,out")),
          instance_examples(concept_dir, "<sks>", "a photo of {token}"), cfg, out, resolution=16, progress=False)
    return out / "pytorch_lora_weights.safetensors"


def _arr(images):
    return np.stack([np.asarray(i) for i in images])


def test_lora_file_gives_the_same_images_in_plain_diffusers(tiny_model, lora_file):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = load_pipeline(str(tiny_model), "dpm++2m-karras", loras=[(str(lora_file), 1.0)])
    ours = _arr(generate(pipe, ["a photo of <sks>"] * 2, [0, 1], steps=8, guidance=5.0))

    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = DPMSolverMultistepScheduler.from_config(plain.scheduler.config, algorithm_type="dpmsolver++",
                                                              solver_order=2, use_karras_sigmas=True)
    plain.load_lora_weights(str(lora_file))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    theirs = _arr(plain(["a photo of <sks>"] * 2, num_inference_steps=8, guidance_scale=5.0, generator=gens).images)
    np.testing.assert_array_equal(ours, theirs)

    base = _arr(generate(load_pipeline(str(tiny_model), "dpm++2m-karras"), ["a photo of <sks>"] * 2, [0, 1], steps=8, guidance=5.0))
    assert np.abs(ours.astype(int) - base.astype(int)).mean() > 1.0  # the LoRA really changes the images


def test_weight_zero_is_the_base_and_weight_scales_the_delta(tiny_model, lora_file):
    base = load_pipeline(str(tiny_model), "euler")
    zero = load_pipeline(str(tiny_model), "euler", loras=[(str(lora_file), 0.0)])
    np.testing.assert_array_equal(_arr(generate(base, ["x"], [3], steps=4)), _arr(generate(zero, ["x"], [3], steps=4)))

    torch.manual_seed(0)
    sample, t, hidden = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        assert torch.equal(base.unet(sample, t, hidden).sample, zero.unet(sample, t, hidden).sample)

    # Per adapted layer, the LoRA delta is linear in the weight: W + w * (alpha/r) * B A.
    to_q = zero.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    x = torch.randn(2, 5, to_q.in_features)

    def out(w):
        zero.set_adapters(["lora_0"], adapter_weights=[w])
        with torch.no_grad():
            return to_q(x)

    d1 = out(1.0) - out(0.0)
    assert d1.abs().max() > 1e-4
    assert torch.allclose(out(0.3) - out(0.0), 0.3 * d1, atol=1e-6)
    assert torch.allclose(out(-2.0) - out(0.0), -2.0 * d1, atol=1e-5)
    # and (alpha / r) = 2 is applied: delta = w * 2 * B A x
    a = to_q.lora_A["lora_0"].weight
    b = to_q.lora_B["lora_0"].weight
    assert torch.allclose(d1, 2.0 * x @ a.T @ b.T, atol=1e-5)


def test_same_seed_same_image_at_any_batch_size(tiny_model):
    pipe = load_pipeline(str(tiny_model), "euler-a")
    one = _arr(generate(pipe, ["a cat"], [7], steps=4))
    many = _arr(generate(pipe, ["a dog", "a cat", "a cat"], [1, 7, 7], steps=4))
    np.testing.assert_array_equal(one[0], many[1])
    np.testing.assert_array_equal(many[1], many[2])


def test_parse_weighted():
    assert parse_weighted("a/b.safetensors:0.8") == ("a/b.safetensors", 0.8)
    assert parse_weighted("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_weighted("C:/x/b.safetensors") == ("C:/x/b.safetensors", 1.0)
    assert parse_weighted("b.safetensors:-0.5") == ("b.safetensors", -0.5)


def test_bad_lora_files_are_clear_errors(tiny_model, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(AdaptError, match="not a readable .safetensors"):
        load_pipeline(str(tiny_model), "euler", loras=[(str(junk), 1.0)])
    from safetensors.torch import save_file

    wrong = tmp_path / "wrong.safetensors"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    save_file({key: torch.zeros(4, 999), key.replace(".lora.down.", ".lora.up."): torch.zeros(32, 4)}, str(wrong))
    with pytest.raises(AdaptError, match="does not fit this model"):
        load_pipeline(str(tiny_model), "euler", loras=[(str(wrong), 1.0)])


def test_model_bundled_names_the_bundled_base_everywhere(tmp_path):
    """`--model bundled` (as `--compare-model bundled`) is the bundled base, unless a folder of that name exists."""
    from adapt.models import BUNDLED_MODEL, resolve_model

    assert resolve_model("bundled") == resolve_model(None) == BUNDLED_MODEL
    (tmp_path / "bundled").mkdir()  # the test runs in tmp_path: a real folder named bundled wins
    with pytest.raises(AdaptError, match="bundled"):
        resolve_model("bundled")
