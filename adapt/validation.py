"""The validation loss: held-out instance images, scored with the loop's own loss at fixed draws.

`--validation-split F` holds out a seeded choice of the instance images (at least one; all of an
image's examples go together; class images are never held out); `--validation-images DIR` uses
that folder's images instead (captions as for --images). Neither is trained on. Their latents and
prompts are cached with the training set's (run.setup), since the VAE and text encoder are released.

The fixed set (`HeldOut`) is drawn ONCE from its own generator (--seed + 4): per entry a latent
sample, noise and a timestep; the timesteps are evenly spaced over the schedule, each image getting
a spread of them (each example repeats until there are at least MIN_SAMPLES entries). Every
evaluation scores exactly these entries, so the curve compares like with like; the training
generators are never touched, so a run trains the same weights with or without validation. The
loss is train.chunk_loss (same --loss, --snr-gamma, masks, precision) under no_grad, with the
trainable modules in eval mode; plain noise, no --noise-offset.

It is measured every --validation-every steps, at the last step, and (--keep-best) at every
checkpoint; metrics.jsonl gets `val_loss` on those steps' rows, and validation.json names the
held-out images and the step with the lowest validation loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import checkpoint_name
from .data import Example, check_images, instance_examples
from .errors import AdaptError
from .fileio import write_json
from .train_config import TrainConfig

log = logging.getLogger("adapt")
MIN_SAMPLES = 16  # (example, timestep) entries in the fixed set, at least: one image still sees the whole schedule
SEED_OFFSET = 4  # its generator: --seed + 4 (the loop's: order --seed, data +1, step +2, tags +3)
SUMMARY = "validation.json"


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(training, held-out) examples: round(fraction x images) images (at least one) chosen by `seed`."""
    images = list(dict.fromkeys(ex.image for ex in examples))
    k = max(1, round(fraction * len(images)))
    if k >= len(images):
        raise AdaptError(f"--validation-split {fraction} holds out {k} of {len(images)} image(s), leaving none to train "
                         "on; add images, lower --validation-split or pass --validation-images DIR")
    held = set(random.Random(seed).sample(images, k))
    return [ex for ex in examples if ex.image not in held], [ex for ex in examples if ex.image in held]


def held_out(examples: list[Example], cfg: TrainConfig, data, template, resolution: int) -> tuple[list, list]:
    """(training, held-out) examples of a run: --validation-images DIR, --validation-split, or none."""
    if cfg.validation_images:
        folder = Path(cfg.validation_images)
        held = check_images(instance_examples(folder, data.token, template, data.class_word, "--validation-images"),
                            resolution, data.skip_bad_images)
        both = {ex.image.resolve() for ex in held} & {ex.image.resolve() for ex in examples}
        if both:
            raise AdaptError(f"--validation-images {folder} holds training images ({min(both).name}); "
                             "pass a folder of other images")
    elif cfg.validation_split:
        examples, held = split(examples, cfg.validation_split, cfg.seed)
    else:
        return examples, []
    images = list(dict.fromkeys(ex.image.name for ex in held))
    log.info("validation loss on %d held-out image(s), not trained on: %s", len(images), ", ".join(images))
    return examples, held


@dataclass
class HeldOut:
    """The fixed validation set, laid out as train.Draw (one entry per (example, timestep); samples:
    (latent sample eps, noise, timestep)) so the loop's chunk_loss scores it as a training batch.
    `chunks`: entries of one latent shape, at most --batch-size each; `losses`: step -> loss."""

    batch: list[Example]
    flipped: list[bool]
    prompts: list[str]
    weights: torch.Tensor  # 1/n each: the loss is the mean over entries
    samples: list[tuple]
    chunks: list[list[int]]
    losses: dict[int, float] = field(default_factory=dict)


def fixed_set(held: list[Example], latents, cfg: TrainConfig, noise_scheduler, device) -> HeldOut:
    """Draw the entries once (see the module docstring); `latents` gives each image's latent shape."""
    T = noise_scheduler.config.num_train_timesteps
    batch = held * -(-MIN_SAMPLES // len(held))  # entry k*len(held)+i is example i: its timesteps spread out
    g = torch.Generator(device).manual_seed(cfg.seed + SEED_OFFSET)
    samples = []
    for j, ex in enumerate(batch):
        shape = latents.shape(ex.image)
        eps, noise = (torch.randn(shape, generator=g, device=device) for _ in range(2))
        samples.append((eps, noise, torch.tensor([int((j + 0.5) * T / len(batch))], device=device)))
    shapes: dict[tuple, list[int]] = {}
    for j, s in enumerate(samples):
        shapes.setdefault(tuple(s[0].shape), []).append(j)
    chunks = [js[i:i + cfg.batch_size] for js in shapes.values() for i in range(0, len(js), cfg.batch_size)]
    n = len(batch)
    return HeldOut(batch, [False] * n, [ex.prompt for ex in batch], torch.full((n,), 1.0 / n), samples, chunks)


def due(cfg: TrainConfig, step: int) -> bool:
    return (step == cfg.steps or bool(cfg.validation_every and step % cfg.validation_every == 0)
            or bool(cfg.keep_best and step % cfg.checkpoint_every == 0))


@contextlib.contextmanager
def scoring(run):
    """No gradients; the trainable modules in eval mode (no dropout: the global generator is not
    drawn from) and unwrapped from DDP (a forward then needs no other process)."""
    acc, c, names = run.accelerator, run.components, run.method.trainable_modules
    for n, m in zip(names, run.modules):
        m.eval()
        setattr(c, n, acc.unwrap_model(m))
    try:
        with torch.no_grad():
            yield
    finally:
        for n, m in zip(names, run.modules):
            m.train()
            setattr(c, n, m)


def measure(run, loss_fn, force: bool = False) -> float | None:
    """The validation loss at this step, when one is due (or `force`), recorded in the set's
    `losses`; None without a validation set or when not due. Every process scores its share of the
    chunks (`loss_fn(run, held_out, js)`: train.chunk_loss); the shares are summed."""
    v, acc = run.validation, run.accelerator
    if v is None or not (force or due(run.cfg, run.step)):
        return None
    total = torch.zeros(1, device=acc.device)
    with scoring(run):
        for js in v.chunks[acc.process_index::acc.num_processes]:
            total += loss_fn(run, v, js).float()
    v.losses[run.step] = acc.reduce(total, reduction="sum").item()
    return v.losses[run.step]


def _best(losses: dict[int, float], steps=None) -> int | None:
    finite = {s: v for s, v in losses.items() if math.isfinite(v) and (steps is None or s in steps)}
    return min(finite, key=finite.get) if finite else None  # a tie: the earlier step


def _checkpointed(run, also: int | None = None) -> set[int]:
    return {s for s in run.validation.losses if s == also or (run.ckpt_root / checkpoint_name(s)).is_dir()}


def protected(run) -> str | None:
    """--keep-best: the name of the checkpoint (on disk, or this step's, being saved) with the lowest
    validation loss, which pruning leaves; None without --keep-best."""
    if run.validation is None or not run.cfg.keep_best:
        return None
    best = _best(run.validation.losses, _checkpointed(run, run.step))
    return None if best is None else checkpoint_name(best)


def loop_state(run) -> dict:
    """What a checkpoint's loop.json carries for validation (nothing without a validation set)."""
    return {} if run.validation is None else {"val_losses": sorted(run.validation.losses.items())}


def restore(run, loop: dict) -> None:
    """A resumed run's validation losses so far (its best step, its --keep-best checkpoint)."""
    if run.validation is not None:
        run.validation.losses = {int(s): v for s, v in loop.get("val_losses", [])}


def summarize(run) -> dict | None:
    """validation.json (written by the main process): the held-out images, the step with the lowest
    validation loss and its loss, the checkpoint with the lowest one (null: none kept), the last
    loss. Returned for the report; None without a validation set."""
    v = run.validation
    if v is None:
        return None
    best, kept = _best(v.losses), _best(v.losses, _checkpointed(run))
    last = v.losses.get(run.step)
    out = {"held_out": list(dict.fromkeys(str(ex.image) for ex in v.batch)), "entries": len(v.batch),
           "best_step": best, "best_val_loss": v.losses[best] if best is not None else None,
           "best_checkpoint": f"checkpoints/{checkpoint_name(kept)}" if kept is not None else None,
           "final_step": run.step, "final_val_loss": last if last is not None and math.isfinite(last) else None}
    if run.accelerator.is_main_process:
        write_json(run.out_dir / SUMMARY, out)
    return out
