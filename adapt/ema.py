"""An exponential moving average (EMA) of the trained weights (`--ema-decay`).

After the n-th optimizer step (n = 1, 2, ...) every trainable parameter's shadow moves toward it:

    shadow_n = shadow_{n-1} + (1 - d_n) * (w_n - shadow_{n-1}),   d_n = min(decay, n / (n + 9))

(torch.lerp). The shadow starts from the weights before training. d_n is diffusers' `EMAModel`
warm-up, (1 + t) / (10 + t) with t = n - 1 (diffusers copies the weights at t = 0; here d_1 = 0.1),
so a short run is not dominated by its untrained start. Only the method's trainable parameters
have a shadow (LoRA adapters, the embedding matrix for textual inversion, the whole UNet); a weight
that does not change keeps a bit-identical shadow (a lerp between equal values is exact). Shadows
are fp32, on the weights' device or, `--ema-on-cpu`, in CPU memory (a full fine-tune's GPU memory
stays as without EMA; each step then copies the trained weights to the CPU).

The artifact holds the EMA weights; `--save-ema both` also writes the trained (raw) weights' artifact
in `OUTPUT/raw/` (the same files, loadable the same way). Validation images show the EMA weights.
Checkpoints hold the shadows (`ema.safetensors`), so a resumed run continues them exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from .formats import RAW_DIR


class EMA:
    """fp32 shadows of `named_params` ({name: parameter}, the run's trainable weights)."""

    def __init__(self, named_params: dict, decay: float, device=None):
        self.params, self.decay = named_params, decay
        self.shadow = {n: p.detach().to(device or p.device, torch.float32, copy=True) for n, p in named_params.items()}

    def decay_at(self, n: int) -> float:
        """The decay used at the n-th optimizer step (1-based)."""
        return min(self.decay, n / (n + 9))

    @torch.no_grad()
    def update(self, n: int) -> None:
        """After the n-th optimizer step: every shadow moves 1 - d_n of the way to its weight."""
        weight = 1 - self.decay_at(n)
        for name, p in self.params.items():
            s = self.shadow[name]
            s.lerp_(p.detach().to(s.device, torch.float32), weight)


def make_ema(cfg, named_params: dict) -> EMA | None:
    """The run's EMA (`cfg`: a TrainConfig), or None when --ema-decay is 0."""
    return EMA(named_params, cfg.ema_decay, "cpu" if cfg.ema_on_cpu else None) if cfg.ema_decay else None


@contextmanager
def swapped(ema: EMA | None):
    """The EMA weights in the model's parameters (in place: peft, accelerate and the optimizer keep
    their parameter objects) for the block; the trained weights come back exactly after it, also on
    an error. A copy of the trained weights is kept where the shadows are. None: nothing changes."""
    if ema is None:
        yield
        return
    kept = {}
    with torch.no_grad():
        for name, p in ema.params.items():
            s = ema.shadow[name]
            kept[name] = p.detach().to(s.device, copy=True)
            p.copy_(s)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in ema.params.items():
                p.copy_(kept[name])


def save_artifact(method, components, out_dir: Path, recipe: dict, ema: EMA | None, both: bool = False) -> None:
    """The method's artifact in out_dir, from the EMA weights when the run has them; `both`: first
    the trained weights' artifact in out_dir/raw (the main artifact is written last)."""
    if ema is not None and both:
        method.save(components, Path(out_dir) / RAW_DIR, recipe)
    with swapped(ema):
        method.save(components, out_dir, recipe)
