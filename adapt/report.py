"""What a training run reports: metrics.jsonl rows, tracker scalars, the loss curve, report.md and
the validation grids (rendered through the inference module)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import torch
from PIL import Image, ImageDraw

from . import infer
from .errors import AdaptError
from .fileio import atomic_path
from .images import make_grid, save_image
from .models import assemble_pipeline
from .schedulers import DEFAULT_SCHEDULER, make_scheduler
from .train_config import TrainConfig


def metric_rows(path: Path, upto: int) -> list[dict]:
    """metrics.jsonl rows of steps <= upto (a resumed run continues the file; a new run empties it)."""
    if not upto or not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= upto]


def start_metrics(path: Path, step: int) -> None:
    """Begin metrics.jsonl at `step`: the rows up to it are kept, later ones (an unsaved tail) dropped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in metric_rows(path, step)))


def append_metrics(path: Path, step: int, loss: float, lr: float, val_loss: float | None = None) -> None:
    """One row per step: {"step", "loss", "lr"}, and "val_loss" on the steps the validation loss was measured."""
    row = {"step": step, "loss": loss, "lr": lr, **({"val_loss": val_loss} if val_loss is not None else {})}
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def tracker_scalars(recipe: dict, prefix: str = "") -> dict:
    """Flatten a recipe to the scalar hyper-parameters trackers accept."""
    out = {}
    for k, v in recipe.items():
        if isinstance(v, dict):
            out.update(tracker_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def render_validation(c, method, trained_modules, cfg: TrainConfig, path: Path, accelerator) -> None:
    """Render the validation prompts with the model as it is now, through the inference module
    (fixed seeds, dpm++2m-karras, the model's guidance), as one grid, in the run's precision: the frozen weights are in
    it already, the trained ones fp32 under the accelerator's autocast; the VAE decodes in its own
    fp32 (infer.decode_in_own_dtype)."""
    if c.vae is None or c.text_encoder is None:
        raise AdaptError("validation needs the VAE and text encoder; they were released")
    parts = {"vae": c.vae, "unet": c.unet, "scheduler": make_scheduler(DEFAULT_SCHEDULER, c.noise_scheduler.config),
             **{n: getattr(c, n) for n in c.text_encoder_names},
             **{n.replace("text_encoder", "tokenizer"): t for n, t in zip(c.text_encoder_names, c.tokenizers)}}
    parts.update({n: accelerator.unwrap_model(getattr(c, n)) for n in method.trainable_modules})
    pipe = assemble_pipeline(c.is_sdxl, parts)
    pipe.set_progress_bar_config(disable=True)
    infer.decode_in_own_dtype(pipe.vae)
    for m in trained_modules:
        m.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            prompts = [method.prompt(p) for p in cfg.validation_prompt]
            images = infer.generate(pipe, prompts, [cfg.seed] * len(prompts), steps=cfg.validation_steps,
                                    guidance=infer.default_guidance(str(c.source)))
    finally:
        for m in trained_modules:
            m.train()
    save_image(make_grid(images), path)


def write_report(out_dir: Path, recipe: dict, losses: list[float], seconds: float, skipped: int,
                 validation: dict | None = None) -> None:
    """report.md: what ran (recipe), how the loss went (and the validation loss: validation.summarize),
    and the validation grids."""
    grids = sorted((out_dir / "validation").glob("*.png")) if (out_dir / "validation").is_dir() else []
    tail = losses[-max(1, len(losses) // 10):]
    lines = [f"# {recipe.get('method', 'adapt')} run", "",
             f"{len(losses)} steps in {seconds:.0f} s; loss {losses[0]:.4f} -> {sum(tail) / len(tail):.4f} "
             f"(mean of the last 10%){f'; {skipped} non-finite batches skipped' if skipped else ''}." if losses else "No steps.",
             "", "![loss](loss.png)", ""]
    if validation and validation["best_step"] is not None:
        lines += [validation_line(validation) + ".", ""]
    if grids:
        lines += ["## Validation samples", ""] + [f"### {g.stem}\n\n![{g.stem}](validation/{g.name})\n" for g in grids]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


def validation_line(v: dict) -> str:
    """The validation loss in one sentence (report.md, the run's last log line); `v`: validation.summarize's."""
    last = f", {v['final_val_loss']:.4f} at the end" if v["final_val_loss"] is not None else ""
    kept = f"best checkpoint: {v['best_checkpoint']}" if v["best_checkpoint"] else "no checkpoint has a validation loss"
    n = len(v["held_out"])
    return (f"Validation loss ({n} held-out image{'s' if n > 1 else ''}, {v['entries']} fixed draws): lowest "
            f"{v['best_val_loss']:.4f} at step {v['best_step']}{last}; {kept} (validation.json)")


def plot_losses(losses: Iterable[float], path: Path, val_losses: dict[int, float] | None = None, size=(640, 360)) -> None:
    """A dependency-free loss curve (raw + moving average) drawn with PIL; with `val_losses` (step
    -> validation loss), the validation curve too, on the same axis."""
    losses = list(losses)
    val = sorted((s, v) for s, v in (val_losses or {}).items() if v == v and abs(v) != float("inf") and 1 <= s <= len(losses))
    img = Image.new("RGB", size, "white")
    if len(losses) >= 2:
        d = ImageDraw.Draw(img)
        w, h, pad = size[0], size[1], 40
        lo, hi = min(losses + [v for _, v in val]), max(losses + [v for _, v in val])
        span = (hi - lo) or 1.0
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]

        def xy(i, v):
            return pad + (w - 2 * pad) * i / (len(losses) - 1), h - pad - (h - 2 * pad) * (v - lo) / span

        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(180, 200, 230), width=1)
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
        if val:
            points = [xy(s - 1, v) for s, v in val]
            d.line(points, fill=(220, 110, 20), width=2)
            for x, y in points:
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(220, 110, 20))
            best = min(val, key=lambda sv: sv[1])
            d.text((pad, h - pad + 8), f"validation loss (orange): lowest {best[1]:.4f} at step {best[0]}", fill=(220, 110, 20))
        d.rectangle([pad, pad, w - pad, h - pad], outline="black")
        d.text((pad, 10), f"loss: {losses[0]:.4f} -> {smooth[-1]:.4f} (avg), {len(losses)} steps", fill="black")
        d.text((4, pad - 6), f"{hi:.3g}", fill="black")
        d.text((4, h - pad - 6), f"{lo:.3g}", fill="black")
    save_image(img, path)
