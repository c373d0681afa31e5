"""Class images for DreamBooth's prior preservation: generated once with the base model, reused.

The set for (model, class prompt, resolution, scheduler, steps, guidance) lives in its own folder
under the cache root (default `outputs/class-images/`), with a `manifest.json`. Image i is
`class-{i:05d}.png`, rendered with seed i, and written atomically as soon as its batch is done:
an interrupted run keeps every finished image, and a larger `--num-class-images` only renders the
missing indices. Runs that share the cache take turns (a folder lock): the second waits while the
first renders, then reuses its images, so no image is rendered twice and the manifest has one
writer. A user's own folder (`--class-images DIR`) is used as it is, topped up the same
way when it holds fewer images than requested.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from pathlib import Path

from tqdm.auto import tqdm

from . import infer  # infer.generate / load_pipeline looked up at call time (tests patch them)
from .errors import AdaptError
from .fileio import IMAGE_SUFFIXES, write_json
from .images import save_image
from .locks import FolderLock, remove_partial_files
from .models import resolve_model
from .schedulers import DEFAULT_SCHEDULER

log = logging.getLogger("adapt")
MANIFEST = "manifest.json"


def cache_folder(root: str | Path, model_path: Path, settings: dict) -> Path:
    key = json.dumps({"model": str(Path(model_path).resolve()), **settings}, sort_keys=True)
    slug = re.sub(r"[^a-z0-9]+", "-", settings["class_prompt"].lower()).strip("-")[:40] or "class"
    return Path(root) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _existing(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")) \
        if folder.is_dir() else []


def ensure_class_images(model: str | None, class_prompt: str, count: int, resolution: int, *,
                        scheduler: str = DEFAULT_SCHEDULER, steps: int = 25, guidance: float = 7.5,
                        folder: str | Path | None = None, cache_root: str | Path = "outputs/class-images",
                        batch_size: int = 8, progress: bool = True, dtype=None) -> tuple[Path, list[Path]]:
    """Make sure at least `count` class images exist; return (folder, the first `count` images).
    Missing ones render in `dtype` (a torch dtype: the run's precision; None: infer.load_pipeline's
    default), which each image's manifest entry records; it is not part of the cache key (a
    bf16 and an fp32 image of one seed differ in a few pixel values, and both serve as the class)."""
    if count < 1:
        raise AdaptError(f"--num-class-images must be >= 1, got {count}")
    model_path = resolve_model(model)
    settings = {"class_prompt": class_prompt, "resolution": resolution, "scheduler": scheduler, "steps": steps,
                "guidance": guidance}
    folder = Path(folder) if folder is not None else cache_folder(cache_root, model_path, settings)
    if folder.exists() and not folder.is_dir():
        raise AdaptError(f"--class-images {folder} is a file; pass a folder")
    have = _existing(folder)
    if len(have) < count:
        # One writer at a time: a second run sharing the cache waits, then finds the images made.
        with FolderLock(folder, "class images", wait=True):
            remove_partial_files(folder)
            have = _existing(folder)
            if len(have) < count:
                _generate(model, model_path, folder, have, count, settings, batch_size, progress, dtype)
                return folder, _existing(folder)[:count]
    log.info("reusing %d class images in %s", count, folder)
    return folder, have[:count]


def _generate(model, model_path: Path, folder: Path, have: list[Path], count: int, settings: dict, batch_size: int,
              progress: bool, dtype) -> None:
    """Render the missing images (the lowest free indices); the caller holds the folder's lock."""
    taken = {p.stem for p in have}
    free = (i for i in itertools.count() if f"class-{i:05d}" not in taken)
    todo = list(itertools.islice(free, count - len(have)))
    class_prompt, scheduler, steps = settings["class_prompt"], settings["scheduler"], settings["steps"]
    pipe = infer.load_pipeline(model, scheduler, dtype=dtype)
    precision = str(pipe.unet.dtype).removeprefix("torch.")
    log.info("generating %d class images for %r in %s (%s, %d steps, %s)", len(todo), class_prompt, folder, scheduler,
             steps, precision)
    manifest_path = folder / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {"model": str(model_path), **settings, "images": []}
    bar = tqdm(total=len(todo), desc="class images", unit="img", disable=not progress)
    for start in range(0, len(todo), batch_size):
        seeds = todo[start:start + batch_size]
        images = infer.generate(pipe, [class_prompt] * len(seeds), seeds, steps=steps, guidance=settings["guidance"],
                                size=settings["resolution"], batch_size=batch_size)
        for seed, img in zip(seeds, images):
            save_image(img, folder / f"class-{seed:05d}.png")
            manifest["images"].append({"file": f"class-{seed:05d}.png", "seed": seed, "dtype": precision})
        write_json(manifest_path, manifest)  # after the images: it never names a file that is not there
        bar.update(len(seeds))
    bar.close()
