"""What the UNet is conditioned on, made in one place: prompts -> input ids (`tokenize`) -> text
conditioning (`encode_prompts`), SDXL's size conditioning, and the two training caches: the VAE
encoder output per (image, flip) and the frozen text encoder output per distinct prompt, each
also kept on disk between runs (diskcache.py) under a key of everything its entry depends on.

Loaded only for training and tests (imports torch); the CLI checks its arguments without it.
"""

from __future__ import annotations

import gc
import hashlib
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import Example, crop_geometry, load_pixels
from .diskcache import DiskCache, fingerprint
from .errors import AdaptError


def tokenize(components, prompt: str):
    """THE place where a prompt becomes input ids, padded and truncated as Stable Diffusion does:
    [1, 77] for SD 1.x/2.x, [1, 2, 77] (one row per tokenizer) for SDXL."""
    ids = [t(prompt, padding="max_length", max_length=t.model_max_length, truncation=True, return_tensors="pt").input_ids
           for t in components.tokenizers]
    return ids[0] if len(ids) == 1 else torch.stack(ids, dim=1)


def encode_prompts(components, input_ids) -> dict:
    """THE place where prompts become the UNet's text conditioning.

    SD 1.x/2.x: {"encoder_hidden_states": last hidden state}. SDXL (as diffusers' SDXL pipeline):
    the penultimate hidden states of both encoders concatenated, and the second encoder's pooled,
    projected output as "text_embeds" (an added_cond_kwargs input of the UNet)."""
    if not components.is_sdxl:
        return {"encoder_hidden_states": components.text_encoder(input_ids)[0]}
    hidden = []
    for i, encoder in enumerate((components.text_encoder, components.text_encoder_2)):
        out = encoder(input_ids[:, i], output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's is the one kept)
    return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}


def size_conditioning(components, original_size, crop_top_left, target_size) -> dict:
    """SDXL's micro-conditioning for one image: time_ids = (orig h, orig w, crop top, crop left,
    target h, target w). Nothing for SD 1.x/2.x. Sizes are (height, width)."""
    if not components.is_sdxl:
        return {}
    return {"time_ids": torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)}


def release(components, name: str) -> None:
    """Drop a frozen module whose outputs are cached, so its memory is free for training."""
    setattr(components, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class LatentCache:
    """VAE encoder output (mean and logvar; the latent is sampled every step) per (image, flip):
    encoded once when `fill`ed, else encoded again for every batch. Keeps the VAE's geometry, so
    latent shapes are known after the VAE is released."""

    def __init__(self, components, sizes: dict[Path, tuple[int, int]], device):
        vae = components.vae.config
        self.components, self.sizes, self.device = components, sizes, device
        self.scaling_factor = vae.scaling_factor
        self.factor = 2 ** (len(vae.block_out_channels) - 1)
        self.channels = vae.latent_channels
        self.cache: dict[tuple[Path, bool], torch.Tensor] = {}

    def shape(self, image: Path) -> tuple[int, int, int]:
        """The latent shape (channels, height, width) of an image at its training size."""
        w, h = self.sizes[image]
        return self.channels, h // self.factor, w // self.factor

    @torch.no_grad()
    def encode(self, batch: list[Example], flipped: list[bool], data: list[bytes | None] | None = None):
        data = data or [None] * len(batch)
        pixels = torch.stack([load_pixels(ex, self.sizes[ex.image], f, d) for ex, f, d in zip(batch, flipped, data)])
        return self.components.vae.encode(pixels.to(self.device)).latent_dist.parameters

    def fill(self, images: list[Path], flips: tuple[bool, ...], show: bool, disk: DiskCache | None = None) -> None:
        """Encode every (image, flip) once, or read it from `disk`. A disk entry's key is the sha256
        of the image file's bytes (encoded from those very bytes), its training size (which fixes
        the crop), the flip, and the VAE's fingerprint (architecture and weights)."""
        vae = fingerprint(self.components.vae) if disk else None
        for image in tqdm(images, desc="caching latents", disable=not show, leave=False):
            data = _read(image) if disk else None
            name = hashlib.sha256(data).hexdigest() if disk else None
            for f in flips:
                key = disk and disk.key(image=name, size=list(self.sizes[image]), flip=f, vae=vae)
                entry = disk and disk.load(key, ("params",))
                if entry:
                    self.cache[(image, f)] = entry["params"]
                    continue
                self.cache[(image, f)] = self.encode([Example(image, "")], [f], [data])[0]
                if disk:
                    disk.save(key, {"params": self.cache[(image, f)]})
        if disk:
            disk.report()

    def params(self, batch: list[Example], flipped: list[bool]):
        """The distribution parameters of a batch, stacked (from the cache when it is filled)."""
        if self.cache:
            return torch.stack([self.cache[(ex.image, f)] for ex, f in zip(batch, flipped)])
        return self.encode(batch, flipped)


class TextCache:
    """Input ids per distinct prompt, and, when `fill`ed (frozen text encoders), their encoder
    output; SDXL's size conditioning per image. Unfilled, a prompt it has not seen (a caption with
    shuffled or dropped tags) is tokenized when it comes."""

    def __init__(self, components, method, prompts: list[str], size_cond: dict, device):
        self.components, self.method, self.device, self.size_cond = components, method, device, size_cond
        self.input_ids = {p: method.tokenize(components, p) for p in prompts}
        self.cache: dict[str, dict] = {}

    def fill(self, accelerator, disk: DiskCache | None = None) -> None:
        """Encode every prompt once, or read it from `disk`. A disk entry's key is the prompt's
        input ids (so the tokenizer and any added tokens are in it), the text encoders'
        fingerprints, which outputs (SDXL's pooled one too) and the mixed precision it ran under."""
        names = ("encoder_hidden_states", "text_embeds") if self.components.is_sdxl else ("encoder_hidden_states",)
        encoders = [fingerprint(getattr(self.components, n)) for n in self.components.text_encoder_names] if disk else None
        with torch.no_grad(), accelerator.autocast():
            for p, ids in self.input_ids.items():
                key = disk and disk.key(ids=ids.tolist(), encoders=encoders, outputs=names,
                                        precision=accelerator.mixed_precision)
                entry = disk and disk.load(key, names)
                if not entry:
                    entry = {k: v[0] for k, v in encode_prompts(self.components, ids.to(self.device)).items()}
                    if disk:
                        disk.save(key, entry)
                self.cache[p] = entry
        if disk:
            disk.report()

    def conditioning(self, batch: list[Example], prompts: list[str]) -> dict:
        """The UNet's conditioning of a batch: encoder_hidden_states, and for SDXL text_embeds and time_ids."""
        if self.cache:
            cond = {key: torch.stack([self.cache[p][key] for p in prompts]) for key in self.cache[prompts[0]]}
        else:
            ids = [self.input_ids[p] if p in self.input_ids else self.method.tokenize(self.components, p) for p in prompts]
            cond = encode_prompts(self.components, torch.cat(ids).to(self.device))
        if self.size_cond:
            cond["time_ids"] = torch.stack([self.size_cond[ex.image]["time_ids"] for ex in batch]).to(self.device)
        return cond


def _read(image: Path) -> bytes:
    try:
        return image.read_bytes()
    except OSError as e:
        raise AdaptError(f"cannot read image {image}: {e}; fix or remove it") from None


def size_conditions(components, examples: list[Example], sizes: dict) -> dict:
    """SDXL's size conditioning per image (original size, crop, target); empty for SD 1.x/2.x."""
    if not components.is_sdxl:
        return {}
    return {ex.image: size_conditioning(components, *crop_geometry(ex, sizes[ex.image]), sizes[ex.image][::-1])
            for ex in examples}
