"""Loss masks: where in an image the loss counts. A mask is the image's alpha channel (with
--mask-from-alpha) or a greyscale `name.mask.png` beside `name.png` (white = learn, black = not),
cut to the training size as the image is (data.fit), then averaged down to the latent size.
Images without a mask have none: their loss is computed as without masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from .data import fit
from .errors import AdaptError
from .images import open_checked


def mask_file(image: Path) -> Path:
    return image.with_name(image.stem + ".mask.png")


def _open(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(open_checked(path))


def read_mask(image: Path, from_alpha: bool) -> Image.Image | None:
    """The mask of an image as an 8-bit greyscale image of the image's size, or None."""
    img = _open(image) if from_alpha else None
    if img is not None and ("A" in img.getbands() or "transparency" in img.info):
        return img.convert("RGBA").getchannel("A")
    path = mask_file(image)
    if not path.is_file():
        return None
    mask, size = _open(path).convert("L"), (img or _open(image)).size
    if mask.size != size:
        raise AdaptError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}; "
                         "make them the same size")
    return mask


def latent_masks(images, sizes: dict, factor: int, from_alpha: bool) -> dict[Path, torch.Tensor]:
    """{image: [1, h, w] float mask in [0, 1] at the latent size} for the images that have a mask
    (unflipped; a flipped sample flips it). `sizes`: (W, H) training size per image."""
    out = {}
    for image in dict.fromkeys(images):
        mask = read_mask(image, from_alpha)
        if mask is None:
            continue
        w, h = sizes[image]
        arr = torch.from_numpy(np.asarray(fit(mask, (w, h)), dtype=np.float32) / 255.0)
        out[image] = F.interpolate(arr[None, None], size=(h // factor, w // factor), mode="area")[0]
    return out


def batch_mask(masks: dict, images: list[Path], flipped: list[bool], shape: tuple[int, ...]):
    """The masks of a batch of one latent shape (C, h, w), stacked as [B, 1, h, w]; all-ones for an
    image without one; None when no image of the batch has a mask (the loss is then unchanged)."""
    if not any(i in masks for i in images):
        return None
    ones = torch.ones((1, *shape[1:]))
    return torch.stack([(masks.get(i, ones)).flip(-1) if f else masks.get(i, ones) for i, f in zip(images, flipped)])
