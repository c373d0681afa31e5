"""Training examples: images + prompts + per-sample loss weights, and the batch order.

An `Example` is one image with its prompt. Prior preservation (DreamBooth) is expressed as data:
class images are examples of another `group` with their own `weight`, and `loss_weights` turns
weights into per-sample loss weights so that the loop's `sum(weight * per_sample_mse)` equals
`mean(instance losses) + weight * mean(class losses)` for a batch that holds both.
"""

from __future__ import annotations

import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .config import DEFAULT_PROMPT
from .errors import AdaptError
from .checks import list_images
from .images import load_rgb, save_image, to_rgb
from .untrusted import check_caption, check_pixels, read_caption

log = logging.getLogger("adapt")


@dataclass(frozen=True)
class Example:
    image: Path
    prompt: str
    weight: float = 1.0  # loss weight of this sample's group (prior_loss_weight for class images)
    group: int = 0  # 0 = instance, 1 = class (prior preservation); weights normalise per group


def check_images(examples: list[Example], resolution: int, skip_bad: bool = False) -> list[Example]:
    """Decode every image once before any model is loaded: a corrupt file is named at once (or
    dropped with a warning under skip_bad); images smaller than the resolution get a warning."""
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
                      class_word: str | None = None, flag: str = "--images") -> list[Example]:
    """Images of `folder`; prompt from `name.txt` beside the image or from `metadata.jsonl`
    (`file_name`/`file` + `text`/`caption`), else from the template; {token} is substituted.
    With a list of templates, an image without a caption gives one example per template. `flag`:
    the option that named the folder, for the error when it is missing or empty."""
    folder = Path(folder)
    images = list_images(folder, flag)
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row.get("file_name") or row["file"]] = check_caption(row.get("text") or row["caption"], f"{meta} line {n}")
            except (json.JSONDecodeError, KeyError, TypeError):
                raise AdaptError(f"{meta} line {n}: expected JSON with 'file_name' and 'text' keys") from None
    templates = [template] if isinstance(template, str) else list(template)
    if templates == [DEFAULT_PROMPT] and class_word:
        templates = [DEFAULT_PROMPT + " {class_word}"]
    out = []
    for img in images:
        txt = img.with_suffix(".txt")
        caption = read_caption(txt) if txt.is_file() else captions.get(img.name)
        for text in [caption] if caption else templates:
            out.append(Example(img, fill_prompt(text, token, class_word)))
    return out


def bucket_size(width: int, height: int, resolution: int, step: int) -> tuple[int, int]:
    """Aspect-ratio bucket of an image: scaled to about resolution^2 pixels, each side rounded down
    to a multiple of `step` (at least one step). Covering the bucket then crops less than `step`
    pixels from each side's scaled length, so nothing important is cut away."""
    scale = (resolution * resolution / (width * height)) ** 0.5
    return max(step, int(width * scale) // step * step), max(step, int(height * scale) // step * step)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as load_rgb will see it, from the header only (EXIF rotation swaps sides)."""
    with Image.open(path) as img:
        check_pixels(img, path)
        w, h = img.size
        return (h, w) if img.getexif().get(0x0112) in (5, 6, 7, 8) else (w, h)


def target_size(example: Example, resolution: int, bucket_step: int | None) -> tuple[int, int]:
    """(width, height) the image is trained at: a square, or its bucket."""
    if not bucket_step:
        return resolution, resolution
    return bucket_size(*image_size(example.image), resolution, bucket_step)


def crop_geometry(example: Example, size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """((original height, width), (crop top, left)) of how load_pixels cuts `size` = (W, H) out of
    the image: SDXL's micro-conditioning inputs."""
    w, h = image_size(example.image)
    width, height = size
    scale = max(width / w, height / h)
    rw, rh = (max(width, round(w * scale)), max(height, round(h * scale))) if scale != 1 else (w, h)
    return (h, w), ((rh - height) // 2, (rw - width) // 2)


def load_pixels(example: Example, size: int | tuple[int, int], flip: bool = False, data: bytes | None = None):
    """Image -> float tensor [3, H, W] in [-1, 1]: scaled (bicubic; upscaled if smaller) to cover
    size = (W, H) (or a square side), center crop, optional horizontal flip. `data`: the image
    file's bytes, already read (the latent disk cache decodes exactly the bytes it hashed)."""
    width, height = (size, size) if isinstance(size, int) else size
    try:
        img = load_rgb(example.image if data is None else io.BytesIO(data))
    except (OSError, ValueError, SyntaxError) as e:
        raise AdaptError(f"cannot read image {example.image}: {e}; fix or remove it") from None
    arr = np.asarray(fit(img, (width, height), flip), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def fit(img: Image.Image, size: tuple[int, int], flip: bool = False) -> Image.Image:
    """Scale (bicubic) to cover size = (W, H), center crop, optional horizontal flip: how an image
    (and its loss mask, masks.py) is cut to its training size."""
    width, height = size
    w, h = img.size
    scale = max(width / w, height / h)
    if scale != 1:
        img = img.resize((max(width, round(w * scale)), max(height, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - width) // 2, (h - height) // 2
    img = img.crop((left, top, left + width, top + height))
    return img.transpose(Image.FLIP_LEFT_RIGHT) if flip else img


def vary_tags(caption: str, generator, *, shuffle: bool, keep: int, dropout: float) -> str:
    """A caption's comma-separated tags for one step (kohya's shuffle_caption / keep_tokens /
    caption_tag_dropout): the first `keep` tags stay in place; each other tag is dropped with
    probability `dropout`, then the rest are shuffled. Tags are re-joined with ", "; the draws come
    from `generator` (one number per droppable tag, then one permutation) so a run is repeatable."""
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:keep], tags[keep:]
    if dropout:
        rest = [t for t, r in zip(rest, torch.rand(len(rest), generator=generator).tolist()) if r >= dropout]
    if shuffle:
        rest = [rest[i] for i in torch.randperm(len(rest), generator=generator).tolist()]
    return ", ".join(kept + rest)


class BatchOrder:
    """Endless batches of example indices: `batch_size` examples from EACH group (instance images;
    class images for prior preservation), so every batch holds both.

    Each group walks through seeded permutations of its examples; batches run across epoch
    boundaries so every batch is full even when a group has fewer examples than the batch size.
    With `keys` (an aspect-ratio bucket per example), a group's batch is taken from the bucket of
    its next pending example, so a batch holds one image size. The batch is the GLOBAL batch of
    all processes (batch_size x num_processes per group); `local` picks this process's share.
    The state (generator + pending indices per group) is saved in checkpoints, so a resumed run
    sees the same batches."""

    def __init__(self, groups: list[int], batch_size: int, seed: int, keys: list | None = None, num_processes: int = 1):
        self.members = [[i for i, g in enumerate(groups) if g == key] for key in sorted(set(groups))]
        self.keys = keys or [None] * len(groups)
        self.batch_size, self.num_processes = batch_size, num_processes
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[list[int]] = [[] for _ in self.members]

    def _refill(self, k: int) -> None:
        members = self.members[k]
        self.pending[k] += [members[j] for j in torch.randperm(len(members), generator=self.generator).tolist()]

    def next(self) -> list[int]:
        size = self.batch_size * self.num_processes
        batch = []
        for k in range(len(self.members)):
            if not self.pending[k]:
                self._refill(k)
            key = self.keys[self.pending[k][0]]
            while sum(self.keys[i] == key for i in self.pending[k]) < size:
                self._refill(k)
            take = [pos for pos, i in enumerate(self.pending[k]) if self.keys[i] == key][:size]
            batch += [self.pending[k][pos] for pos in take]
            chosen = set(take)
            self.pending[k] = [i for pos, i in enumerate(self.pending[k]) if pos not in chosen]
        return batch

    def local(self, batch: list, rank: int) -> list:
        """This process's share of a global batch: its slice of every group."""
        size = self.batch_size * self.num_processes
        return [batch[k * size + rank * self.batch_size + j] for k in range(len(self.members)) for j in range(self.batch_size)]


def loss_weights(batch: list[Example]):
    """Per-sample loss weights: weight / (samples of the same group in the batch).

    Plain data -> 1/B each (a plain mean). Instance + class samples ->
    mean(instance) + lambda * mean(class), the DreamBooth prior-preservation loss.
    """
    counts: dict[int, int] = {}
    for ex in batch:
        counts[ex.group] = counts.get(ex.group, 0) + 1
    return torch.tensor([ex.weight / counts[ex.group] for ex in batch], dtype=torch.float32)


def dataset_examples(name_or_path: str, image_column: str, caption_column: str, token: str | None,
                     class_word: str | None, folder: str | Path) -> list[Example]:
    """Examples from a Hugging Face dataset: an imagefolder (images + metadata.jsonl), a dataset
    saved with save_to_disk, or a hub dataset already in the local cache (nothing is downloaded).
    The images are written once as PNGs under `folder`, so the rest of the pipeline (caching,
    resume) works on files; captions get {token} / {class_word} filled in."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets  # lazy: optional and slow, only for --dataset (and after the offline switch above)

    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
        elif path.is_dir():
            ds = datasets.load_dataset("imagefolder", data_dir=str(path))
        elif path.exists():
            raise AdaptError(f"--dataset {path} is a file; pass a dataset folder or a hub name")
        else:
            ds = datasets.load_dataset(name_or_path)
    except AdaptError:
        raise
    except Exception as e:  # datasets raises many types (FileNotFoundError, ConnectionError, DatasetNotFoundError...)
        raise AdaptError(f"cannot load dataset {name_or_path!r} ({str(e).splitlines()[0][:160]}); pass an imagefolder, "
                         "a save_to_disk folder, or a hub dataset already in the local cache") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise AdaptError(f"dataset {name_or_path!r} has no 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    for flag, column in (("--image-column", image_column), ("--caption-column", caption_column)):
        if column not in ds.column_names:
            raise AdaptError(f"dataset {name_or_path!r} has no column {column!r} (columns: {', '.join(ds.column_names)}); "
                             f"pass {flag} NAME")
    if len(ds) == 0:
        raise AdaptError(f"dataset {name_or_path!r} is empty")

    folder = Path(folder)
    out = []
    for i, row in enumerate(ds):
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise AdaptError(f"dataset column {image_column!r} does not hold images (row {i} is {type(image).__name__})")
        caption = row[caption_column]
        if not isinstance(caption, str):
            raise AdaptError(f"dataset column {caption_column!r} does not hold text (row {i} is {type(caption).__name__})")
        check_caption(caption, f"dataset row {i}")
        file = folder / f"{i:05d}.png"
        if not file.is_file():
            save_image(to_rgb(image), file)
        out.append(Example(file, fill_prompt(caption, token, class_word)))
    return out
