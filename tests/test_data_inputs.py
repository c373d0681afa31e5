"""Data inputs: --dataset (imagefolder, saved datasets, columns), aspect-ratio buckets and
captions from image.txt or metadata.jsonl in --images folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from adapt.config import LoraConfig
from adapt.data import BatchOrder, Example, bucket_size, dataset_examples, load_pixels
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

LORA = "pytorch_lora_weights.safetensors"


# --- aspect-ratio buckets -----------------------------------------------------------------------

@pytest.mark.parametrize("w,h", [(512, 512), (1024, 512), (640, 480), (300, 1200), (1920, 1080), (1000, 999), (64, 2000)])
def test_buckets_crop_less_than_one_step(w, h):
    res, step = 512, 64
    bw, bh = bucket_size(w, h, res, step)
    assert bw % step == 0 and bh % step == 0
    assert bw * bh <= res * res * 1.0001
    scale = max(bw / w, bh / h)  # load_pixels scales the image to cover the bucket, then crops
    assert round(w * scale) - bw < step and round(h * scale) - bh < step


def test_bucketed_training_caches_latents_at_each_images_shape(tiny_model, tmp_path):
    folder = tmp_path / "shapes"
    folder.mkdir()
    sizes = {"wide": (64, 32), "tall": (32, 64), "square": (48, 48)}
    for name, size in sizes.items():
        Image.new("RGB", size, (200, 30, 30)).save(folder / f"{name}.png")
    examples = [Example(folder / f"{n}.png", "a photo of <sks>") for n in sizes]
    assert bucket_size(64, 32, 32, 16) == (32, 16)  # ~32^2 pixels, sides multiples of 16
    assert load_pixels(examples[0], bucket_size(64, 32, 32, 16)).shape == (3, 16, 32)

    c = load_components(tiny_model)
    calls = []
    real = c.vae.encode
    c.vae.encode = lambda x: (calls.append(tuple(x.shape)), real(x))[1]
    result = train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=4, batch_size=2, lr=1e-2), tmp_path / "o",
                   resolution=32, bucket_step=16, progress=False)
    assert result["steps"] == 4 and all(np.isfinite(result["losses"]))
    assert sorted(calls) == sorted([(1, 3, 16, 32), (1, 3, 32, 16), (1, 3, 32, 32)])  # once per image, at its bucket

    order = BatchOrder([0] * 6, 2, 0, keys=["a", "b", "a", "b", "c", "c"])
    for _ in range(10):
        batch = order.next()
        assert len({["a", "b", "a", "b", "c", "c"][i] for i in batch}) == 1  # one image size per batch


# --- datasets ----------------------------------------------------------------------------------

def test_dataset_inputs_and_missing_columns(tiny_model, concept_dir, tmp_path):
    import datasets

    folder = tmp_path / "imagefolder"
    folder.mkdir()
    rows = []
    for i, p in enumerate(sorted(concept_dir.glob("*.png"))):
        Image.open(p).save(folder / p.name)
        rows.append({"file_name": p.name, "text": f"a photo of {{token}} number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples = dataset_examples(str(folder), "image", "text", "<sks>", None, tmp_path / "mat")
    assert [e.prompt for e in examples] == [f"a photo of <sks> number {i}" for i in range(3)]
    assert all(e.image.is_file() and e.image.parent == tmp_path / "mat" for e in examples)

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"img": [Image.open(e.image) for e in examples], "caption": ["x {token}"] * 3}) \
        .cast_column("img", datasets.Image()).save_to_disk(str(saved))
    assert [e.prompt for e in dataset_examples(str(saved), "img", "caption", "<t>", None, tmp_path / "m2")] == ["x <t>"] * 3
    with pytest.raises(AdaptError, match=r"no column 'image' \(columns: img, caption\); pass --image-column"):
        dataset_examples(str(saved), "image", "caption", "<t>", None, tmp_path / "m3")
    with pytest.raises(AdaptError, match="cannot load dataset 'nobody/nothing'"):
        dataset_examples("nobody/nothing", "image", "text", "<t>", None, tmp_path / "m4")

    out = tmp_path / "run"
    code, log = run("lora", "--dataset", folder, "--token", "<sks>", "--model", tiny_model, "--steps", "2", "--output", out)
    assert code == 0, log
    assert json.loads((out / "recipe.json").read_text())["data"]["dataset"] == str(folder)
    assert "pass either --images DIR or --dataset" in run("lora", "--dataset", folder, "--images", concept_dir,
                                                          "--token", "<sks>")[1]


def test_images_folder_captions_from_txt_or_metadata_jsonl(concept_dir, tmp_path):
    import shutil

    from adapt.data import instance_examples

    folder = tmp_path / "imgs"
    shutil.copytree(concept_dir, folder)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "text": "a {token} from jsonl"}) + "\n")
    (folder / "img1.txt").write_text("a {token} from txt\n")
    prompts = {e.image.name: e.prompt for e in instance_examples(folder, "<t>", "a photo of {token}")}
    assert prompts == {"img0.png": "a <t> from jsonl", "img1.png": "a <t> from txt", "img2.png": "a photo of <t>"}
    (folder / "metadata.jsonl").write_text("{not json\n")
    with pytest.raises(AdaptError, match="metadata.jsonl line 1"):
        instance_examples(folder, "<t>", "x")
