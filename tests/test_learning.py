"""Learning tests on the bundled emoji base model: it behaves like a real model in miniature
(draws what it is asked, in the style asked for, ignores a word it never learned, varies across
seeds), and LoRA, DreamBooth and textual inversion on examples/cat teach it Twemoji's cats.
Images are compared in eval's feature space against tests/data/emoji (22 emoji in six styles).
Each run is short (seconds to ~40 s on 2 CPU cores); fixed seeds make the numbers repeatable."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from adapt.config import LoraConfig, TextualInversionConfig
from adapt.data import Example, instance_examples
from adapt.infer import generate, load_pipeline
from adapt.methods.full import FullMethod
from adapt.methods.lora import LoraMethod
from adapt.methods.textual_inversion import TextualInversionMethod
from adapt.metrics import diversity, features, nearest_style, pairwise_distances
from adapt.models import BUNDLED_MODEL, load_components, model_defaults
from adapt.train import train
from adapt.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "cat"
EMOJI = ROOT / "tests" / "data" / "emoji"
STYLES = ("noto", "openmoji", "fluent-flat", "fluent-modern", "fluent-line")
SEEDS = list(range(8))
GUIDANCE = model_defaults(BUNDLED_MODEL).get("guidance", 7.5)
PHRASES = model_defaults(BUNDLED_MODEL).get("styles", {})
KNOWN = {json.loads(line)["file"] for line in (BUNDLED_MODEL / "training_set.jsonl").read_text().splitlines()}
META = [m for m in map(json.loads, (EMOJI / "metadata.jsonl").read_text().splitlines()) if m["file"] in KNOWN]  # emoji the base knows
CATS = [m for m in META if "cat" in m["name"].split()]
CLASS_PROMPT = "an emoji of cat face"  # DreamBooth's class
pytestmark = pytest.mark.slow
# Issue 13's targets that the current base (4,800 + 4,000 training steps; see README) does not reach yet:
# kept as strict xfails, so they report the day a better base meets them.
UNDERTRAINED = pytest.mark.xfail(strict=True, reason="the bundled base is under-trained for this target (README)")


def _render(prompts, seeds, model=None, **kw):
    pipe = load_pipeline(None if model is None else str(model), "dpm++2m-karras", **kw)
    return features(generate(pipe, prompts, seeds, steps=25, guidance=GUIDANCE, batch_size=16))


def _cells(styles=STYLES, metas=META):
    return [(s, m["file"]) for m in metas for s in styles if s in m["styles"]]


def _nearest(gen, cells):
    refs = features([EMOJI / s / f for s, f in cells])
    return [cells[j] for j in pairwise_distances(gen, refs).argmin(1)]


def _twemoji_cat_rate(gen):
    """Fraction of images whose nearest cat drawing (12 cat emoji x 6 styles) is a Twemoji one."""
    return float(np.mean([s == "twemoji" for s, _ in _nearest(gen, _cells((*STYLES, "twemoji"), CATS))]))


def test_the_bundled_base_ships_its_data_and_style_phrases():
    train_cells = [json.loads(x) for x in (BUNDLED_MODEL / "training_set.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (BUNDLED_MODEL / "heldout.jsonl").read_text().splitlines()]
    assert {"file", "name", "style"} <= train_cells[0].keys() and {"file", "name", "style"} <= held[0].keys()
    assert len(held) >= 0.05 * (len(train_cells) + len(held))
    assert not {(c["file"], c["style"]) for c in held} & {(c["file"], c["style"]) for c in train_cells}
    assert {c["style"] for c in train_cells} == set(STYLES) == set(PHRASES)  # no Twemoji in the base
    for cfg in BUNDLED_MODEL.rglob("*.json"):
        assert "_name_or_path" not in json.loads(cfg.read_text()), cfg  # no build-machine paths


def _styled():
    metas = [m for m in META if len(m["styles"]) == 6][:16]
    styles = [STYLES[i % 5] for i in range(len(metas))]
    gen = _render([f"an emoji of {m['name']}, {PHRASES[s]}" for m, s in zip(metas, styles)], list(range(len(metas))))
    return metas, styles, gen


@UNDERTRAINED
def test_base_draws_the_style_asked_for():
    metas, styles, gen = _styled()
    got = nearest_style(gen, {s: features([EMOJI / s / m["file"] for m in metas]) for s in STYLES})
    assert np.mean([s == want for s, want in zip(got, styles)]) >= 0.7  # chance 1/5; measured 0.688 (4,800-step base 0.375)


def test_base_draws_the_emoji_asked_for():
    metas, _, gen = _styled()
    got = _nearest(gen, _cells(STYLES, metas))
    assert np.mean([f == m["file"] for (_, f), m in zip(got, metas)]) >= 0.75  # chance 1/16; measured 0.875 (4,800-step base 0.56)


@functools.lru_cache(maxsize=1)  # two tests read the same renders
def _plain_and_rare():
    metas = META[:: 2]
    prompts = [f"an emoji of {m['name']}" for m in metas]
    seeds = list(range(len(metas)))
    plain = _nearest(_render(prompts, seeds), _cells())
    rare = _nearest(_render([p.replace("of ", "of <sks> ") for p in prompts], seeds), _cells())
    return metas, plain, rare


def test_a_word_the_base_never_learned_does_not_change_what_it_draws():
    _, plain, rare = _plain_and_rare()
    assert np.mean([a[1] == b[1] for a, b in zip(plain, rare)]) >= 0.8  # same emoji retrieved; measured 0.90 (old base 0.55)


def test_with_a_word_it_never_learned_the_base_still_draws_the_emoji_asked_for():
    metas, _, rare = _plain_and_rare()
    assert np.mean([f == m["file"] for (_, f), m in zip(rare, metas)]) >= 0.7  # measured 1.000 (4,800-step base 0.40)


def test_prompts_without_a_style_vary_across_seeds_and_styles():
    metas = [m for m in META if len(m["styles"]) == 6][:4]
    gen = _render([f"an emoji of {m['name']}" for m in metas for _ in SEEDS], SEEDS * len(metas))
    distinct = []
    for k, m in enumerate(metas):
        block = gen[8 * k:8 * k + 8]
        refs = {s: np.repeat(features([EMOJI / s / m["file"]]), 8, 0) for s in STYLES}
        distinct.append(len(set(nearest_style(block, refs))))
    assert np.mean(distinct) >= 2.5, distinct
    assert diversity(gen, [k // 8 for k in range(len(gen))])["mean"] > 3.0


def test_short_lora_moves_images_toward_twemoji_cats(tmp_path):
    prompt = ["an emoji of <sks> cat face"] * 16
    base = _render(prompt, list(range(16)))
    rec = model_defaults(BUNDLED_MODEL)["lora"]
    train(load_components(None), LoraMethod(LoraConfig()), instance_examples(CAT, "<sks>", "x"),
          TrainConfig(steps=rec["steps"], lr=rec["lr"]), tmp_path, resolution=64, progress=False)
    lora = _render(prompt, list(range(16)), loras=[(str(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)])
    # the recommended run (benchmarks/learning.py measured 1.000 at 750 steps, 0.750 at 500); at half the steps the
    # margin was thin enough to pass alone and fail in one full-suite run
    assert _twemoji_cat_rate(lora) >= _twemoji_cat_rate(base) + 0.4, (_twemoji_cat_rate(base), _twemoji_cat_rate(lora))


def _class_examples(tmp_path, weight):
    """8 class images of CLASS_PROMPT from the bundled base, as DreamBooth's prior examples at `weight`."""
    from adapt.classimages import ensure_class_images

    _, files = ensure_class_images(None, CLASS_PROMPT, 8, 64, steps=25, guidance=GUIDANCE, cache_root=tmp_path / "cls",
                                   progress=False)
    return [Example(f, CLASS_PROMPT, weight, 1) for f in files]


def test_dreambooth_prior_preservation_keeps_the_class_and_learns_the_instance(tmp_path):
    instance = instance_examples(CAT, "sks", "x")
    rec = model_defaults(BUNDLED_MODEL)["dreambooth"]
    prior_examples = _class_examples(tmp_path, rec.get("prior_loss_weight", 1.0))
    base = _render([CLASS_PROMPT] * 8, SEEDS)
    drift = {}
    for prior in (True, False):
        ex = instance + (prior_examples if prior else [])
        train(load_components(None), FullMethod(), ex, TrainConfig(steps=rec["steps"], lr=rec["lr"]), tmp_path / str(prior),
              resolution=64, progress=False)
        drift[prior] = float(np.linalg.norm(_render([CLASS_PROMPT] * 8, SEEDS, tmp_path / str(prior)) - base, axis=1).mean())
    # same steps and seed: the prior keeps the class closer to the base (benchmarks/learning.py, 16 class images at
    # the model's guidance, weight 0.1: 4.60 vs 7.42; issue 13 asks for <= 1/3, not reached on this base)
    assert drift[True] < 0.95 * drift[False], drift


def test_dreambooth_lora_at_the_models_settings_learns_the_instance(tmp_path):
    """`adapt dreambooth --lora` takes adapt.json's "dreambooth-lora" section. At the settings it took before (the
    generic 1e-4 x 500, prior weight 1.0) this run drew no Twemoji cat (0.000); at the section's it drew 0.375 with class
    images at guidance 7.5, and 0.500 at the model's 3 (what runs render them at now), 1 thread."""
    prompt, rec = ["an emoji of sks cat face"] * 16, model_defaults(BUNDLED_MODEL)["dreambooth-lora"]
    ex = instance_examples(CAT, "sks", "x") + _class_examples(tmp_path, rec["prior_loss_weight"])
    train(load_components(None), LoraMethod(LoraConfig()), ex, TrainConfig(steps=rec["steps"], lr=rec["lr"]), tmp_path,
          resolution=64, progress=False)
    base = _twemoji_cat_rate(_render(prompt, list(range(16))))
    lora = _twemoji_cat_rate(_render(prompt, list(range(16)), loras=[(str(tmp_path / "pytorch_lora_weights.safetensors"), 1.0)]))
    assert lora >= base + 0.25, (base, lora)  # benchmarks/learning.py (16 class images, training seeds 0-2): 0.60


@UNDERTRAINED
def test_textual_inversion_token_draws_twemoji_cats(tmp_path):
    rec = model_defaults(BUNDLED_MODEL)["textual-inversion"]
    train(load_components(None), TextualInversionMethod(TextualInversionConfig(init_token="cat"), "<cat-toy>"), instance_examples(CAT, "<cat-toy>", "x"),
          TrainConfig(steps=rec["steps"], lr=rec["lr"]), tmp_path, resolution=64, progress=False)
    learned = _render(["an emoji of <cat-toy>"] * 8, SEEDS, embeddings=[(str(tmp_path / "learned_embeds.safetensors"), None)])
    init = _render(["an emoji of cat"] * 8, SEEDS)
    assert _twemoji_cat_rate(learned) >= _twemoji_cat_rate(init) + 0.25  # benchmarks/learning.py (16 seeds): 0.062
