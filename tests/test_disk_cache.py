"""The disk cache of latents and text embeddings (adapt/diskcache.py): a second run on the same data
encodes nothing and trains bit-identically; any change to an input (one pixel of one image, the
VAE's or the text encoder's weights, the prompt) is encoded again; a damaged entry is re-encoded."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.diskcache import DiskCache, cache_root
from adapt.encode import LatentCache, TextCache
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.run import make_accelerator
from adapt.train import train
from adapt.train_config import TrainConfig

LORA = "pytorch_lora_weights.safetensors"


def spy(c) -> dict[str, list]:
    """Record every VAE encode (batch size) and text-encoder forward (prompts) of these components."""
    calls = {"vae": [], "text": []}
    encode, forward = c.vae.encode, c.text_encoder.forward
    c.vae.encode = lambda x, *a, **k: (calls["vae"].append(x.shape[0]), encode(x, *a, **k))[1]
    c.text_encoder.forward = lambda ids, *a, **k: (calls["text"].append(ids.shape[0]), forward(ids, *a, **k))[1]
    return calls


def test_second_run_encodes_nothing_and_trains_bit_identically(tiny_model, concept_dir, tmp_path, caplog):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, caption_dropout=0.3, cache_dir=str(tmp_path / "cache"))
    runs = []
    for k in range(2):
        c = load_components(tiny_model)
        calls = spy(c)
        with caplog.at_level(logging.INFO, logger="adapt"):
            caplog.clear()
            r = train(c, LoraMethod(LoraConfig()), examples, cfg, tmp_path / f"run{k}", resolution=16, random_flip=True,
                      progress=False)
        runs.append((r["losses"], load_file(str(tmp_path / f"run{k}" / LORA)), calls, caplog.text))
    (losses0, lora0, calls0, log0), (losses1, lora1, calls1, log1) = runs
    assert sum(calls0["vae"]) == 3 * 2 and sum(calls0["text"]) == 2  # 3 images x 2 flips; the prompt and ""
    assert calls1 == {"vae": [], "text": []}  # the second run read everything from disk
    assert "latents: 0 of 6 from the disk cache" in log0 and "latents: 6 of 6 from the disk cache" in log1
    assert "text: 0 of 2 from the disk cache" in log0 and "text: 2 of 2 from the disk cache" in log1
    assert losses1 == losses0
    assert lora1.keys() == lora0.keys() and all(torch.equal(lora1[k], lora0[k]) for k in lora0)


def fill_latents(c, images: list[Path], root: Path, flips=(False,)) -> tuple[LatentCache, DiskCache]:
    latents = LatentCache(c, {i: (16, 16) for i in images}, torch.device("cpu"))
    disk = DiskCache(root, "latents", "cpu")
    latents.fill(images, flips, show=False, disk=disk)
    return latents, disk


def test_one_changed_pixel_reencodes_that_image_only(tiny_model, concept_dir, tmp_path):
    folder = shutil.copytree(concept_dir, tmp_path / "images")
    images = sorted(folder.glob("*.png"))
    c = load_components(tiny_model)
    first, _ = fill_latents(c, images, tmp_path / "cache", flips=(False, True))
    pixels = np.array(Image.open(images[1]))
    pixels[12, 12, 0] ^= 1  # one bit of one channel of one pixel (the disc's centre)
    Image.fromarray(pixels).save(images[1])
    calls = spy(c)
    second, disk = fill_latents(c, images, tmp_path / "cache", flips=(False, True))
    assert calls["vae"] == [1, 1] and (disk.hits, disk.lookups) == (4, 6)  # that image, both flips
    for image in images:
        for f in (False, True):
            same = torch.equal(second.cache[(image, f)], first.cache[(image, f)])
            assert same == (image != images[1]), (image.name, f)


def test_changed_vae_weights_or_size_miss(tiny_model, concept_dir, tmp_path):
    images = sorted(concept_dir.glob("*.png"))
    c = load_components(tiny_model)
    fill_latents(c, images, tmp_path / "cache")
    _, disk = fill_latents(c, images, tmp_path / "cache")
    assert disk.hits == 3
    with torch.no_grad():
        c.vae.encoder.conv_in.bias[0] += 1e-6
    calls = spy(c)
    _, disk = fill_latents(c, images, tmp_path / "cache")
    assert disk.hits == 0 and sum(calls["vae"]) == 3
    latents = LatentCache(c, {i: (24, 24) for i in images}, torch.device("cpu"))  # another training size
    latents.fill(images, (False,), show=False, disk=(disk := DiskCache(tmp_path / "cache", "latents", "cpu")))
    assert disk.hits == 0 and sum(calls["vae"]) == 6


def fill_text(c, prompts: list[str], root: Path, accelerator) -> tuple[TextCache, DiskCache]:
    texts = TextCache(c, LoraMethod(LoraConfig()), prompts, {}, torch.device("cpu"))
    disk = DiskCache(root, "text", "cpu")
    texts.fill(accelerator, disk=disk)
    return texts, disk


def test_text_entries_follow_prompt_and_text_encoder_weights(tiny_model, tmp_path):
    c = load_components(tiny_model)
    accelerator = make_accelerator(TrainConfig(mixed_precision="no"), tmp_path)  # a settled precision, as setup passes
    root = tmp_path / "cache"
    first, _ = fill_text(c, ["a photo of <sks>", ""], root, accelerator)
    again, disk = fill_text(c, ["a photo of <sks>", "a photo of <sks> cat"], root, accelerator)
    assert (disk.hits, disk.lookups) == (1, 2)  # the new prompt is encoded
    assert torch.equal(again.cache["a photo of <sks>"]["encoder_hidden_states"],
                       first.cache["a photo of <sks>"]["encoder_hidden_states"])
    with torch.no_grad():
        c.text_encoder.get_input_embeddings().weight[0, 0] += 1e-6
    _, disk = fill_text(c, ["a photo of <sks>", ""], root, accelerator)
    assert disk.hits == 0


def test_a_damaged_entry_is_encoded_again_with_a_warning(tiny_model, concept_dir, tmp_path, caplog):
    images = sorted(concept_dir.glob("*.png"))
    c = load_components(tiny_model)
    first, disk = fill_latents(c, images, tmp_path / "cache")
    entries = sorted((tmp_path / "cache" / "latents").rglob("*.safetensors"))
    assert len(entries) == 3 and not list((tmp_path / "cache").rglob("*.tmp"))  # whole files, no leftovers
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # cut short, as by a full disk elsewhere
    entries[1].write_bytes(entries[2].read_bytes())  # another entry's content under this name
    with caplog.at_level(logging.WARNING, logger="adapt"):
        second, disk = fill_latents(c, images, tmp_path / "cache")
    assert disk.hits == 1 and caplog.text.count("encoding again") == 2
    assert all(torch.equal(second.cache[k], first.cache[k]) for k in first.cache)
    _, disk = fill_latents(c, images, tmp_path / "cache")  # the damaged entries were replaced
    assert disk.hits == 3


def test_unwritable_cache_folder_warns_once_and_trains(tiny_model, concept_dir, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    c = load_components(tiny_model)
    with caplog.at_level(logging.WARNING, logger="adapt"):
        latents, disk = fill_latents(c, sorted(concept_dir.glob("*.png")), blocker)
    assert len(latents.cache) == 3 and caplog.text.count("cannot write the latents disk cache") == 1


def test_off_switch_and_trained_text_encoder_write_nothing(tiny_model, concept_dir, tmp_path, monkeypatch):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    monkeypatch.setenv("ADAPT_CACHE_DIR", str(tmp_path / "default"))
    cfg = TrainConfig(steps=1, disk_cache=False)
    train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, cfg, tmp_path / "off", resolution=16,
          progress=False)
    assert not (tmp_path / "default").exists()
    te = LoraMethod(LoraConfig(train_text_encoder=True))
    train(load_components(tiny_model), te, examples, TrainConfig(steps=1), tmp_path / "te", resolution=16, progress=False)
    assert sorted(p.name for p in (tmp_path / "default").iterdir()) == ["latents"]  # no text entries


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("ADAPT_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root(None) == tmp_path / "home" / ".cache" / "adapt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(None) == tmp_path / "xdg" / "adapt"
    monkeypatch.setenv("ADAPT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(None) == tmp_path / "env"
    assert cache_root(str(tmp_path / "flag")) == tmp_path / "flag"


@pytest.mark.parametrize("flag", ["--no-disk-cache", "--cache-dir"])
def test_cli_flags(flag, tiny_model, concept_dir, tmp_path):
    from conftest import run

    extra = [flag] if flag == "--no-disk-cache" else [flag, tmp_path / "mine"]
    code, out = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--steps", "1",
                    "--resolution", "16", "--output", tmp_path / "out", *extra)
    assert code == 0, out
    recipe = (tmp_path / "out" / "recipe.json").read_text()
    if flag == "--no-disk-cache":
        assert '"disk_cache": false' in recipe and not (tmp_path / "mine").exists()
    else:
        assert len(list((tmp_path / "mine" / "latents").rglob("*.safetensors"))) == 3
