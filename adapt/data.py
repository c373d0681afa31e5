"""Training examples: images + prompts + per-sample loss weights, and the batch order.

An `Example` is one image with its prompt. Prior preservation (DreamBooth) is expressed as data:
class images are examples of another `group` with their own `weight`, and `collate` turns
weights into per-sample loss weights so that the loop's `sum(weight * per_sample_mse)` equals
`mean(instance losses) + weight * mean(class losses)` for a batch that holds both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import AdaptError
from PIL import Image

from .images import IMAGE_SUFFIXES, load_rgb


@dataclass(frozen=True)
class Example:
    image: Path
    prompt: str
    weight: float = 1.0  # loss weight of this sample's group (prior_loss_weight for class images)
    group: int = 0  # 0 = instance, 1 = class (prior preservation); weights normalise per group


def list_images(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.exists():
        raise AdaptError(f"image folder {folder} does not exist; pass --images DIR with your training images")
    if not folder.is_dir():
        raise AdaptError(f"--images {folder} is a file; pass the folder that holds the images")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not images:
        raise AdaptError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; put your training images there")
    return images


def check_images(examples: list[Example], resolution: int, skip_bad: bool = False) -> list[Example]:
    """Decode every image once before any model is loaded: a corrupt file is named at once (or
    dropped with a warning under skip_bad); images smaller than the resolution get a warning."""
    import logging

    log = logging.getLogger("adapt")
    bad: set[Path] = set()
    for image in dict.fromkeys(ex.image for ex in examples):
        try:
            size = load_rgb(image).size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            if not skip_bad:
                raise AdaptError(f"cannot read image {image} ({str(e).splitlines()[0]}); fix or remove it, "
                                 "or pass --skip-bad-images") from None
            log.warning("skipping unreadable image %s (%s)", image, str(e).splitlines()[0])
            bad.add(image)
            continue
        if min(size) < resolution:
            log.warning("image %s is %dx%d, smaller than the training resolution %d: upscaled", image, *size, resolution)
    kept = [ex for ex in examples if ex.image not in bad]
    if not kept:
        raise AdaptError("none of the images could be read; pass a folder of valid .png/.jpg images")
    return kept


def fill_prompt(template: str, token: str | None, class_word: str | None) -> str:
    text = template.replace("{token}", token or "").replace("{class_word}", class_word or "")
    return " ".join(text.split())  # a missing class word leaves no double space


def instance_examples(folder: str | Path, token: str | None, template: str | list[str],
                      class_word: str | None = None) -> list[Example]:
    """Images of `folder`; prompt from `name.txt` beside the image or from `metadata.jsonl`
    (`file_name`/`file` + `text`/`caption`), else from the template; {token} is substituted.
    With a list of templates, an image without a caption gives one example per template."""
    folder = Path(folder)
    images = list_images(folder)
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row.get("file_name") or row["file"]] = row.get("text") or row["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AdaptError(f"{meta} line {n}: expected JSON with 'file_name' and 'text' keys") from None
    templates = [template] if isinstance(template, str) else list(template)
    if templates == ["a photo of {token}"] and class_word:
        templates = ["a photo of {token} {class_word}"]
    out = []
    for img in images:
        txt = img.with_suffix(".txt")
        caption = txt.read_text().strip() if txt.is_file() else captions.get(img.name)
        for text in [caption] if caption else templates:
            out.append(Example(img, fill_prompt(text, token, class_word)))
    return out


def load_pixels(example: Example, resolution: int, flip: bool = False):
    """Image -> float tensor [3, H, W] in [-1, 1]: shorter side resized to `resolution`
    (bicubic; upscaled if smaller), center crop, optional horizontal flip."""
    import numpy as np
    import torch
    from PIL import Image

    try:
        img = load_rgb(example.image)
    except (OSError, ValueError, SyntaxError) as e:
        raise AdaptError(f"cannot read image {example.image}: {e}; fix or remove it") from None
    w, h = img.size
    scale = resolution / min(w, h)
    if scale != 1:
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    img = img.crop((left, top, left + resolution, top + resolution))
    if flip:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


class BatchOrder:
    """Endless batches of indices: `batch_size` examples from EACH group (instance images; class
    images for prior preservation), so every batch holds both. Each group walks through seeded
    permutations of its examples; batches run across epoch boundaries so every batch is full
    even when a group has fewer examples than the batch size. The state (generator + pending
    indices per group) is saved in checkpoints so a resumed run sees the same batches."""

    def __init__(self, groups: list[int], batch_size: int, seed: int):
        import torch

        self.members = [[i for i, g in enumerate(groups) if g == key] for key in sorted(set(groups))]
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[list[int]] = [[] for _ in self.members]

    def next(self) -> list[int]:
        import torch

        batch = []
        for k, members in enumerate(self.members):
            while len(self.pending[k]) < self.batch_size:
                self.pending[k] += [members[j] for j in torch.randperm(len(members), generator=self.generator).tolist()]
            batch += self.pending[k][:self.batch_size]
            self.pending[k] = self.pending[k][self.batch_size:]
        return batch


def tokenize(tokenizer, prompt: str):
    """Prompt -> input_ids [1, 77], padded and truncated as Stable Diffusion does."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def loss_weights(batch: list[Example]):
    """Per-sample loss weights: weight / (samples of the same group in the batch).

    Plain data -> 1/B each (a plain mean). Instance + class samples ->
    mean(instance) + lambda * mean(class), the DreamBooth prior-preservation loss.
    """
    import torch

    counts: dict[int, int] = {}
    for ex in batch:
        counts[ex.group] = counts.get(ex.group, 0) + 1
    return torch.tensor([ex.weight / counts[ex.group] for ex in batch], dtype=torch.float32)
