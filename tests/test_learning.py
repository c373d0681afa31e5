"""Learning tests on the bundled emoji base model: it is a real model, and LoRA, DreamBooth and
textual inversion on examples/cat move its images toward examples/cat (eval's feature space).
Each run is short (seconds to ~30 s on 2 CPU cores); fixed seeds make the numbers repeatable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt.config import LoraConfig, TrainConfig
from adapt.data import Example, instance_examples, list_images
from adapt.metrics import distance_to_set, features, retrieval
from adapt.infer import generate, load_pipeline
from adapt.methods.full import FullMethod
from adapt.methods.lora import LoraMethod
from adapt.methods.textual_inversion import TextualInversionMethod
from adapt.models import BUNDLED_MODEL, load_components
from adapt.train import train

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "cat"
SEEDS = list(range(8))
pytestmark = pytest.mark.slow


def _feats(model=None, prompt="an emoji of <sks> cat face", guidance=3.0, **kw):
    pipe = load_pipeline(None if model is None else str(model), "dpm++2m-karras", **kw)
    return features(generate(pipe, [prompt] * len(SEEDS), SEEDS, steps=25, guidance=guidance))


@pytest.fixture(scope="module")
def cat_refs():
    return features(list_images(CAT))


def test_bundled_base_is_a_real_model():
    rows = [json.loads(line) for line in (BUNDLED_MODEL / "training_set.jsonl").read_text().splitlines()]
    assert len(rows) >= 100 and {"name", "file", "caption"} <= rows[0].keys()
    rows = rows[:20]
    pipe = load_pipeline(None, "dpm++2m-karras")
    images = generate(pipe, [r["caption"] for r in rows], list(range(len(rows))), steps=25, guidance=7.5, batch_size=10)
    assert images[0].size == (64, 64)
    refs = features([ROOT / "tests" / "data" / "noto-refs" / r["file"] for r in rows])
    fid = retrieval(features(images), refs, list(range(len(rows))))
    assert fid["top1"] >= 0.5  # an emoji drawn from its caption is recognisably that emoji (chance: 0.05)


def test_lora_moves_images_toward_the_concept(cat_refs, tmp_path):
    base = distance_to_set(_feats(), cat_refs)
    ex = instance_examples(CAT, "<sks>", "a photo of {token}")
    train(load_components(None), LoraMethod(LoraConfig()), ex, TrainConfig(steps=200, lr=1e-3), tmp_path, resolution=64,
          progress=False)
    lora = distance_to_set(_feats(loras=[(str(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)]), cat_refs)
    assert lora < base - 0.2, (base, lora)


def _class_drift(unet, base_unet, hidden, latents, noise, t, scheduler):
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        return float(((unet(noisy, t, hidden).sample - base_unet(noisy, t, hidden).sample) ** 2).mean())


def test_dreambooth_prior_preservation_keeps_the_class_and_learns_the_instance(cat_refs, tmp_path):
    from adapt.classimages import ensure_class_images
    from adapt.models import encode_prompts, tokenize_prompt

    class_prompt = "an emoji of cat face"
    _, class_files = ensure_class_images(None, class_prompt, 8, 64, steps=25, cache_root=tmp_path / "cls", progress=False)
    instance = instance_examples(CAT, "sks", "x")
    runs = {}
    for prior in (True, False):
        ex = instance + ([Example(f, class_prompt, 1.0, 1) for f in class_files] if prior else [])
        c = load_components(None)
        train(c, FullMethod(), ex, TrainConfig(steps=150, lr=1e-4, cache_text=False, cache_latents=False), tmp_path / str(prior),
              resolution=64, progress=False)
        runs[prior] = c

    base = load_components(None)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(16, 4, 16, 16, generator=g), torch.randn(16, 4, 16, 16, generator=g)
    t = torch.linspace(50, 950, 16).long()
    with torch.no_grad():
        hidden = encode_prompts(base, tokenize_prompt(base, class_prompt)).pop("encoder_hidden_states").expand(16, -1, -1)
    drift = {p: _class_drift(runs[p].unet.eval(), base.unet, hidden, latents, noise, t, base.noise_scheduler) for p in runs}
    assert drift[True] < 0.8 * drift[False], drift  # same steps and seed: the prior keeps the class closer to the base

    inst = distance_to_set(_feats(tmp_path / "True", "an emoji of sks cat face"), cat_refs)
    assert inst < distance_to_set(_feats(None, "an emoji of sks cat face"), cat_refs) - 0.5


def test_textual_inversion_token_beats_its_init_token(cat_refs, tmp_path):
    ex = instance_examples(CAT, "<cat-toy>", "x")
    train(load_components(None), TextualInversionMethod("<cat-toy>", "cat"), ex, TrainConfig(steps=300, lr=5e-3), tmp_path,
          resolution=64, progress=False)
    learned = distance_to_set(_feats(prompt="an emoji of <cat-toy>",
                                     embeddings=[(str(tmp_path / "learned_embeds.safetensors"), None)]), cat_refs)
    init = distance_to_set(_feats(prompt="an emoji of cat"), cat_refs)
    assert learned < init - 0.3, (learned, init)
