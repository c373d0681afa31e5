"""DreamBooth: batches hold instance and class images, class images are generated once and reused,
the full-UNet result is a plain diffusers pipeline folder, DreamBooth-LoRA shares the code path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adapt.infer
from adapt.classimages import MANIFEST, ensure_class_images
from adapt.data import BatchOrder
from conftest import run


def test_every_batch_holds_instance_and_class_images():
    groups = [0] * 3 + [1] * 10
    order = BatchOrder(groups, batch_size=2, seed=0)
    seen_class = set()
    for _ in range(20):
        batch = order.next()
        assert [groups[i] for i in batch] == [0, 0, 1, 1]
        seen_class.update(batch[2:])
    assert seen_class == set(range(3, 13))  # every class image is used
    # one group: seeded permutations, epoch after epoch (the plain case is unchanged)
    plain = BatchOrder([0] * 4, batch_size=2, seed=0)
    assert sorted(plain.next() + plain.next()) == [0, 1, 2, 3]


def _pixels(path):
    return np.asarray(Image.open(path))


def test_class_images_generated_once_topped_up_and_interrupt_safe(tiny_model, tmp_path, monkeypatch):
    kw = dict(scheduler="euler", steps=2, cache_root=tmp_path / "cache", batch_size=2, progress=False)
    folder, files = ensure_class_images(str(tiny_model), "a photo of cat", 3, 16, **kw)
    assert [f.name for f in files] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["class_prompt"] == "a photo of cat" and [i["seed"] for i in manifest["images"]] == [0, 1, 2]
    first = {f.name: _pixels(f) for f in files}

    # reused: a second run does not load a pipeline at all
    def fail(*a, **k):
        raise AssertionError("class images regenerated")

    monkeypatch.setattr(adapt.infer, "load_pipeline", fail)
    assert ensure_class_images(str(tiny_model), "a photo of cat", 3, 16, **kw) == (folder, files)
    monkeypatch.undo()

    # interrupted during the second batch of a top-up: the finished batch is kept, nothing half-written
    calls = {"n": 0}
    real_generate = adapt.infer.generate

    def interrupted(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_generate(*a, **k)

    monkeypatch.setattr(adapt.infer, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_class_images(str(tiny_model), "a photo of cat", 7, 16, **kw)
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == [f"class-{i:05d}.png" for i in range(5)]
    assert len(json.loads((folder / MANIFEST).read_text())["images"]) == 5
    monkeypatch.undo()

    # the top-up finishes the missing indices only; old images are untouched, and image i is the
    # same as in a set generated in one go (seed i)
    _, files = ensure_class_images(str(tiny_model), "a photo of cat", 7, 16, **kw)
    assert [f.name for f in files] == [f"class-{i:05d}.png" for i in range(7)]
    assert all(np.array_equal(first[n], _pixels(folder / n)) for n in first)
    fresh, fresh_files = ensure_class_images(str(tiny_model), "a photo of cat", 7, 16,
                                             **{**kw, "cache_root": tmp_path / "fresh"})
    assert all(np.array_equal(_pixels(a), _pixels(b)) for a, b in zip(files, fresh_files))
    other, _ = ensure_class_images(str(tiny_model), "a photo of dog", 1, 16, **kw)
    assert other != folder


def _unet_state(folder):
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"))


def test_full_dreambooth_saves_a_plain_diffusers_pipeline(tiny_model, concept_dir, tmp_path, standard_clip_keys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "db"
    code, log = run("dreambooth", "--images", concept_dir, "--token", "sks", "--class-word", "disc",
                    "--model", tiny_model, "--num-class-images", "2", "--class-steps", "2", "--steps", "3",
                    "--lr", "1e-3", "--output", out)
    assert code == 0, log
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["method"] == "dreambooth" and recipe["dreambooth"]["prior_preservation"] is True
    assert recipe["dreambooth"]["class_prompt"] is None and recipe["train"]["lr"] == 1e-3

    pipe = StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    base = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, base.unet.state_dict()[k])]
    assert len(changed) > len(pipe.unet.state_dict()) // 2  # the whole UNet trains
    for name in ("vae", "text_encoder"):  # frozen parts are the base's, bit for bit
        a, b = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
    img = pipe("a photo of sks disc", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (16, 16)
    standard_clip_keys(out / "text_encoder")  # copied from the base, in the standard layout too


def test_text_encoder_option_and_default_lr(tiny_model, concept_dir, tmp_path, standard_clip_keys):
    from transformers import CLIPTextModel

    out = tmp_path / "db-te"
    code, log = run("dreambooth", "--images", concept_dir, "--token", "sks", "--model", tiny_model,
                    "--no-prior-preservation", "--train-text-encoder", "--steps", "2", "--output", out)
    assert code == 0, log
    assert json.loads((out / "recipe.json").read_text())["train"]["lr"] == 5e-6  # DreamBooth's default
    te = CLIPTextModel.from_pretrained(out / "text_encoder").state_dict()
    base = CLIPTextModel.from_pretrained(Path(tiny_model) / "text_encoder").state_dict()
    assert any(not torch.equal(te[k], base[k]) for k in te)
    standard_clip_keys(out / "text_encoder")  # transformers 4.x and 5 load it; ComfyUI detects it


def test_dreambooth_lora_runs_the_lora_method_with_prior_preservation(tiny_model, concept_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "db-lora"
    code, log = run("dreambooth", "--lora", "--images", concept_dir, "--token", "sks", "--class-prompt",
                    "a photo of a disc", "--model", tiny_model, "--num-class-images", "2", "--class-steps", "2",
                    "--steps", "2", "--output", out)
    assert code == 0, log
    keys = load_file(str(out / "pytorch_lora_weights.safetensors")).keys()
    assert keys and all(".lora." in k and (".to_q." in k or ".to_k." in k) for k in keys)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["dreambooth"]["lora"] is True and recipe["train"]["lr"] == 1e-4


def test_prior_preservation_needs_a_class(tiny_model, concept_dir, tmp_path):
    code, log = run("dreambooth", "--images", concept_dir, "--token", "sks", "--model", tiny_model,
                    "--output", tmp_path / "x")
    assert code == 2 and "needs --class-word" in log
    code, log = run("dreambooth", "--images", concept_dir, "--token", "sks", "--class-word", "disc",
                    "--class-scheduler", "nope", "--model", tiny_model)
    assert code == 2 and "unknown scheduler 'nope'" in log


def test_class_and_validation_images_render_at_the_models_guidance(tiny_model, concept_dir, tmp_path, monkeypatch):
    """The model's adapt.json guidance (the bundled base's 3) is how it samples: class images (the prior the run keeps)
    and validation images render at it, as `adapt generate` does; both used the pipeline default 7.5 before."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "adapt.json").write_text(json.dumps({"guidance": 2.0}))
    seen, real = [], adapt.infer.generate

    def spy(pipe, prompts, seeds, **kw):
        seen.append(kw.get("guidance"))
        return real(pipe, prompts, seeds, **kw)

    monkeypatch.setattr(adapt.infer, "generate", spy)
    code, log = run("dreambooth", "--lora", "--images", concept_dir, "--token", "sks", "--class-prompt", "a photo of a disc",
                    "--model", model, "--num-class-images", "2", "--class-steps", "2", "--class-images", tmp_path / "cls",
                    "--steps", "2", "--validation-prompt", "a photo of sks", "--validation-steps", "2",
                    "--output", tmp_path / "run")
    assert code == 0, log
    assert json.loads((tmp_path / "cls" / MANIFEST).read_text())["guidance"] == 2.0
    assert len(seen) >= 2 and set(seen) == {2.0}  # the class images' batch and the validation grid
