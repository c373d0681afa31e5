"""Small image helpers shared by data loading, generation and evaluation (PIL + numpy only)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .fileio import atomic_path
from .untrusted import check_pixels



def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB; transparency is composited on white (emoji and logos are RGBA).

    EXIF orientation is applied first so phone photos are not sideways.
    """
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bit instead of clipping everything to white.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray((arr / peak * 255.0).round().astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def open_checked(path: str | os.PathLike) -> Image.Image:
    """An image file, decoded, after its size was checked from the header (untrusted.check_pixels)."""
    with Image.open(path) as img:
        check_pixels(img, path)  # from the header, before decoding
        img.load()
        return img


def load_rgb(path: str | os.PathLike) -> Image.Image:
    return to_rgb(open_checked(path))


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all resized to the first one's size) into a near-square grid."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, img in enumerate(images):
        grid.paste(img.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def save_image(img: Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically: a crash leaves either the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)
