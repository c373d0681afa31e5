"""Models and images the benchmarks build: the tiny test model or the real SD 1.5 architecture with
random weights (nothing downloaded), and random RGB images."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _components(name: str):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from adapt import models as M

    unet, vae, text = {"tiny": (M.TINY_UNET, M.TINY_VAE, M.TINY_TEXT), "sd15": (M.SD15_UNET, M.SD15_VAE, M.SD15_TEXT)}[name]
    torch.manual_seed(0)
    c = M.Components(CLIPTokenizer.from_pretrained(M.TOKENIZER_DIR), CLIPTextModel(CLIPTextConfig(**text)),
                     AutoencoderKL(**vae), UNet2DConditionModel(**unet), DDPMScheduler(**M.SD15_SCHEDULER), Path("."))
    for m in (c.text_encoder, c.vae, c.unet):
        m.requires_grad_(False).eval()
    return c


def _images(folder: Path, size: int, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder
