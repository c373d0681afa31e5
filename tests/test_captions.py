"""Caption tags (issue 18): --shuffle-tags, --keep-tokens, --tag-dropout. Repeatable under the
seed, different from step to step, the first N tags kept, exact on resume, encoded correctly with
the text cache asked for (it is then off: each step's captions go through the text encoder)."""

from __future__ import annotations

import shutil

import pytest
import torch

import adapt.encode
from adapt.config import LoraConfig
from adapt.data import instance_examples, vary_tags
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig

CAPTION = "<sks>, a cat, red, sitting, grass, sunny, photo, outdoors"
TAGS = [t.strip() for t in CAPTION.split(",")]


def _vary(seed, n=20, **kw):
    g = torch.Generator().manual_seed(seed)
    return [vary_tags(CAPTION, g, **{"shuffle": True, "keep": 0, "dropout": 0.0, **kw}) for _ in range(n)]


def test_vary_tags_is_seeded_varies_per_call_and_keeps_the_first_n():
    a = _vary(0, keep=2)
    assert a == _vary(0, keep=2) and a != _vary(1, keep=2)
    assert len(set(a)) > 10  # a new order (nearly) every call
    for caption in a:
        tags = caption.split(", ")
        assert tags[:2] == TAGS[:2] and sorted(tags) == sorted(TAGS)
    dropped = _vary(0, n=200, keep=1, dropout=0.5, shuffle=False)
    for caption in dropped:
        tags = caption.split(", ")
        assert tags[0] == "<sks>" and tags == [t for t in TAGS if t in tags]  # order kept without --shuffle-tags
    lengths = [len(c.split(", ")) - 1 for c in dropped]
    assert min(lengths) <= 1 and max(lengths) >= 6 and abs(sum(lengths) / len(lengths) - 3.5) < 0.5
    assert vary_tags("a,, b ,c", torch.Generator(), shuffle=False, keep=0, dropout=0.0) == "a, b, c"
    with pytest.raises(AdaptError, match="--tag-dropout"):
        TrainConfig(tag_dropout=1.0)


@pytest.fixture
def tagged_dir(concept_dir, tmp_path):
    folder = tmp_path / "tagged"
    shutil.copytree(concept_dir, folder)
    for i, img in enumerate(sorted(folder.glob("*.png"))):
        img.with_suffix(".txt").write_text(CAPTION.replace("a cat", f"cat {i}"))
    return folder


@pytest.fixture
def seen(monkeypatch):
    """The prompts each chunk of training is conditioned on, in order."""
    prompts, real = [], adapt.encode.TextCache.conditioning

    def spy(self, batch, p):
        prompts.append(list(p))
        return real(self, batch, p)

    monkeypatch.setattr(adapt.encode.TextCache, "conditioning", spy)
    return prompts


def _train(model, folder, out, seen=None, **kw):
    """Train 4 steps; returns (result, the prompts each step was conditioned on)."""
    if seen is not None:
        seen.clear()
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, **kw)
    result = train(load_components(model), LoraMethod(LoraConfig()), instance_examples(folder, "<sks>", "x"), cfg, out,
                   resolution=16, recipe={"r": 1}, progress=False)
    return result, list(seen or [])


def test_training_captions_are_seeded_shuffled_per_step_and_keep_the_first_n(tiny_model, tagged_dir, tmp_path, seen):
    opts = dict(shuffle_tags=True, keep_tokens=1, tag_dropout=0.2)
    a, seen_a = _train(tiny_model, tagged_dir, tmp_path / "a", seen, **opts)
    b, seen_b = _train(tiny_model, tagged_dir, tmp_path / "b", seen, **opts)
    assert seen_a == seen_b and a["losses"] == b["losses"] and len(seen_a) == 4
    captions = [p for step in seen_a for p in step]
    assert len(set(captions)) == len(captions)  # a new caption every step
    assert all(p.startswith("<sks>, ") for p in captions)
    plain, _ = _train(tiny_model, tagged_dir, tmp_path / "plain")
    assert plain["losses"] != a["losses"]
    # with the cache on (the default) and off, the same captions reach the text encoder: same run
    uncached, _ = _train(tiny_model, tagged_dir, tmp_path / "nocache", cache_text=False, **opts)
    assert uncached["losses"] == a["losses"]


def test_resume_with_shuffled_tags_equals_an_uninterrupted_run(tiny_model, tagged_dir, tmp_path):
    from safetensors.torch import load_file

    opts = dict(shuffle_tags=True, keep_tokens=1, tag_dropout=0.3, caption_dropout=0.2)
    full, _ = _train(tiny_model, tagged_dir, tmp_path / "a", **opts)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000002"
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    resumed, _ = _train(tiny_model, tagged_dir, tmp_path / "b", resume="latest", **opts)
    assert resumed["losses"] == full["losses"]
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
