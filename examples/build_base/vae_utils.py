"""Helpers for train_vae.py: the VAE, its loss and learning-rate schedule, the data order, image folders
as tensors, atomic file writes, checkpoints, VAE round trips and PSNR."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adapt.fileio import atomic_path
from adapt.images import load_rgb


def build_vae(block_out_channels=(32, 64, 64), norm_num_groups=32, sample_size=64):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=1,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def progress(step: int, total_steps: int, seconds: float, max_seconds: float) -> float:
    """Training progress in [0, 1]: by steps or by wall time, whichever is further along."""
    p = step / max(1, total_steps)
    if max_seconds > 0:
        p = max(p, seconds / max_seconds)
    return min(1.0, p)


def lr_factor(step: int, prog: float, warmup: int, min_ratio: float = 0.05) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio`` as prog -> 1."""
    w = min(1.0, (step + 1) / max(1, warmup))
    return w * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * prog)))


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> torch.Tensor:
    """Indices of the batch for a global step: a fresh permutation per epoch, seeded by
    (seed, epoch), so the order is reproducible and resumable; the last partial batch is dropped."""
    per_epoch = n // batch_size
    epoch, k = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n, generator=g)
    return perm[k * batch_size:(k + 1) * batch_size]


def vae_loss(vae, x: torch.Tensor, kl_weight: float):
    posterior = vae.encode(x).latent_dist
    z = posterior.sample()
    rec = vae.decode(z).sample
    mse = F.mse_loss(rec, x)
    kl = posterior.kl().mean()  # summed over latent dims, averaged over the batch (as SD)
    return mse + kl_weight * kl, mse, kl


def load_folder(folder: str | os.PathLike, files: list[str] | None = None, size: int = 64):
    """Load images as a float tensor (N, 3, size, size) in [-1, 1]; returns (tensor, files)."""
    folder = Path(folder)
    if files is None:
        files = sorted(p.name for p in folder.iterdir() if p.suffix.lower() == ".png")
    return load_paths([folder / f for f in files], size), files


def load_folders(folders: list[str], exclude: set[tuple[str, str]], size: int = 64):
    """All PNGs of several style folders except the (style folder name, file) cells in `exclude`."""
    paths = [p for f in folders for p in sorted(Path(f).glob("*.png")) if (p.parent.name, p.name) not in exclude]
    return load_paths(paths, size), [f"{p.parent.name}/{p.name}" for p in paths]


def load_paths(paths: list[Path], size: int = 64) -> torch.Tensor:
    arrs = []
    for path in paths:
        img = load_rgb(path)
        if img.size != (size, size):
            img = img.resize((size, size), resample=3)  # bicubic
        arrs.append(np.asarray(img, dtype=np.uint8))
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x.contiguous()


def save_checkpoint(ckpt_path: Path, vae, opt, step: int, train_seconds: float, args) -> None:
    with atomic_path(ckpt_path) as tmp:
        torch.save({
            "model": vae.state_dict(), "optimizer": opt.state_dict(),
            "torch_rng": torch.get_rng_state(), "step": step,
            "train_seconds": train_seconds, "args": vars(args),
        }, tmp)


def load_checkpoint(ckpt_path: Path, vae, opt, args) -> tuple[int, float]:
    """Load the model, optimiser and RNG state of a checkpoint; returns (step, seconds trained)."""
    ck = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    if ck["args"]["steps"] != args.steps or ck["args"]["block_out_channels"] != args.block_out_channels:
        raise SystemExit(f"{ckpt_path} was made with different --steps/--block-out-channels; "
                         "pass --fresh to start over")
    vae.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    torch.set_rng_state(ck["torch_rng"])
    step, elapsed_before = ck["step"], ck["train_seconds"]
    print(f"resumed from {ckpt_path} at step {step} ({elapsed_before:.0f}s trained)", flush=True)
    return step, elapsed_before


@torch.inference_mode()
def encode_decode(vae, x: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means of ``x`` and their decodes (clamped to [-1, 1]), batch by batch."""
    means, recs = [], []
    for i in range(0, len(x), batch_size):
        z = vae.encode(x[i:i + batch_size]).latent_dist.mean
        means.append(z)
        recs.append(vae.decode(z).sample.clamp(-1, 1))
    return torch.cat(means), torch.cat(recs)


def psnr(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean per-image PSNR, PSNR of the pooled MSE) in dB, images in [-1, 1] mapped to [0, 1]."""
    a, b = (x.clamp(-1, 1) + 1) / 2, (y.clamp(-1, 1) + 1) / 2
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean()), float(10 * torch.log10(1 / mse.mean()))


def to_pil(x: torch.Tensor):
    from PIL import Image

    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")
