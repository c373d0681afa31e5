"""THE training loop: epsilon (or v) prediction on VAE latents, shared by every method.

A method (see methods/) says which modules hold trainable weights, which parameters train, what
to do after each optimizer step and how to save. The loop never asks which method it runs.

Per step (names as in diffusers' examples):
    latents       = vae.encode(pixels).latent_dist.sample() * scaling_factor   (encoder output cached)
    noise         ~ N(0, I);  timesteps ~ U{0 .. T-1}
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    model_pred    = unet(noisy_latents, timesteps, encoder_hidden_states)       (text output cached when frozen)
    target        = noise, or noise_scheduler.get_velocity(...) for v-prediction models
    loss          = sum_i loss_weight_i * mean((model_pred_i - target_i)^2)      (weights: data.loss_weights)

The loop is four named steps on a `Run` (run.py sets it up): `draw` the global batch and its
randomness, `train_step` on this process's share, `record` a finished optimizer step (validation
loss, metrics, checkpoint, graceful stop, validation renders), and `finish` (save, report).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from tqdm.auto import tqdm

from .checkpoint import list_checkpoints, save_checkpoint
from .data import Example, loss_weights, vary_tags
from .ema import save_artifact, swapped
from .errors import AdaptError
from .losses import diffusion_loss
from .masks import batch_mask
from .optim import armed, release, steps_in_backward
from .precision import autocast, recasts
from .report import append_metrics, plot_losses, render_validation, start_metrics, tracker_scalars, write_report
from .run import Run, eval_weights, setup, train_weights
from .signals import graceful_stop
from .train_config import TrainConfig
from .validation import loop_state, measure, protected, summarize


log = logging.getLogger("adapt")


@graceful_stop
def train(components, method, examples: list[Example], cfg: TrainConfig, out_dir: str | Path, *,
          resolution: int, random_flip: bool = False, bucket_step: int | None = None, recipe: dict | None = None,
          progress: bool = True, stop=None, mask_from_alpha: bool = False, validation: list[Example] | None = None) -> dict:
    """Train `method` on `examples`; write metrics.jsonl, loss.png, report.md and the method's
    artifact to out_dir. Runs as one process or as one of several (accelerate launch): every
    process draws the randomness of the whole global batch and trains on its share, so N
    processes x batch B equal one process x batch N*B. SIGTERM/SIGINT: see signals.py. Loss masks:
    masks.py (`mask_from_alpha`: from the images' alpha channels, else from `name.mask.png` files).
    `validation`: held-out examples for the validation loss (validation.py)."""
    run = setup(components, method, examples, cfg, Path(out_dir), resolution=resolution, random_flip=random_flip,
                bucket_step=bucket_step, recipe=recipe, progress=progress, mask_from_alpha=mask_from_alpha,
                validation=validation)
    try:
        return loop(run, cfg, progress, stop)
    finally:
        release(run.optimizer)  # --fused-backward's hooks: the weights must not step by themselves after the run


def loop(run: Run, cfg: TrainConfig, progress: bool, stop) -> dict:
    """The steps from where `run` stands to cfg.steps, then `finish`."""
    acc = run.accelerator
    if acc.is_main_process:
        start_metrics(run.metrics_path, run.step)  # a resumed run continues the file
    if cfg.log_with:
        acc.init_trackers("adapt", config=tracker_scalars(run.recipe or {}))
    bar = tqdm(total=cfg.steps, initial=run.step, desc="training", unit="step", disable=not (progress and acc.is_main_process))
    start = last = time.perf_counter()
    running = 0.0
    while run.step < cfg.steps:
        value = train_step(run, draw(run))
        if value is None:  # a non-finite loss, skipped
            continue
        running += value / cfg.grad_accum
        if not acc.sync_gradients:
            continue
        last = record(run, running, last, bar, stop)
        running = 0.0
    bar.close()
    return finish(run, time.perf_counter() - start)


@dataclass
class Draw:
    """A global batch (the same on every process) and its randomness, per sample in global order."""

    batch: list[Example]
    flipped: list[bool]
    prompts: list[str]  # "" where the caption was dropped
    weights: torch.Tensor
    samples: list[tuple]  # (latent sample eps, noise, timestep)


def draw(run: Run) -> Draw:
    """The next global batch, its flips and caption dropout (data generator), its captions' tags
    (tags generator, with --shuffle-tags / --tag-dropout), then per sample its latent sample,
    noise (+ offset) and timestep (step generator), in this order."""
    cfg, data_rng, step_rng, device = run.cfg, run.generators["data"], run.generators["step"], run.accelerator.device
    batch = [run.examples[i] for i in run.order.next()]
    flipped = [bool(run.random_flip and torch.rand((), generator=data_rng) < 0.5) for _ in batch]
    dropped = [bool(cfg.caption_dropout and torch.rand((), generator=data_rng) < cfg.caption_dropout) for _ in batch]
    prompts = [ex.prompt for ex in batch]
    if cfg.varies_tags:  # its own generator: the other draws are the same with these options off
        prompts = [vary_tags(p, run.generators["tags"], shuffle=cfg.shuffle_tags, keep=cfg.keep_tokens,
                             dropout=cfg.tag_dropout) for p in prompts]
    prompts = ["" if d else p for p, d in zip(prompts, dropped)]
    weights = loss_weights(batch) * run.accelerator.num_processes  # DDP averages gradients over processes; x N makes it the global sum
    T = run.components.noise_scheduler.config.num_train_timesteps
    samples = []
    for ex in batch:
        shape = run.latents.shape(ex.image)
        eps = torch.randn(shape, generator=step_rng, device=device)
        noise = torch.randn(shape, generator=step_rng, device=device)
        if cfg.noise_offset:
            noise = noise + cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=step_rng, device=device)
        samples.append((eps, noise, torch.randint(0, T, (1,), generator=step_rng, device=device)))
    return Draw(batch, flipped, prompts, weights, samples)


def train_step(run: Run, d: Draw) -> float | None:
    """Forward and backward of this process's share of `d`, one chunk per image size (gradients are
    all-reduced once, after the last chunk), then the optimizer step when accumulation is complete.
    Returns the micro-batch's loss, or None when a non-finite loss skipped it."""
    acc = run.accelerator
    chunks: dict[tuple, list[int]] = {}  # this process's share, one forward per image size
    for j in run.order.local(list(range(len(d.batch))), acc.process_index):
        chunks.setdefault(tuple(d.samples[j][0].shape), []).append(j)
    value, bad = 0.0, None
    with acc.accumulate(*run.modules):
        for k, js in enumerate(chunks.values()):
            with contextlib.ExitStack() as sync:
                if k < len(chunks) - 1:
                    for m in run.modules:
                        sync.enter_context(acc.no_sync(m))
                armed(run.optimizer, acc.sync_gradients and k == len(chunks) - 1)  # --fused-backward: steps in this backward
                loss = chunk_loss(run, d, js)
                part = acc.reduce(loss.detach().float(), reduction="mean").item()
                if not math.isfinite(part):  # checked before backward: a bad batch never reaches the weights
                    bad = part
                    break
                value += part
                acc.backward(loss)
        if bad is not None:
            skip_nonfinite(run, bad)
            return None
        if acc.sync_gradients and run.cfg.max_grad_norm > 0 and not steps_in_backward(run.optimizer):
            acc.clip_grad_norm_(run.params, run.cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return value


def chunk_loss(run: Run, d: Draw, js: list[int]):
    """The loss of the samples `js` (all of one image size) of the draw."""
    c, batch = run.components, [d.batch[j] for j in js]
    dist = DiagonalGaussianDistribution(run.latents.params(batch, [d.flipped[j] for j in js]))
    eps = torch.stack([d.samples[j][0] for j in js]).to(dist.mean.dtype)
    latents = (dist.mean + dist.std * eps) * run.latents.scaling_factor
    with autocast(run.accelerator, recasts(run.cfg)):
        cond = run.texts.conditioning(batch, [d.prompts[j] for j in js])
        hidden = cond.pop("encoder_hidden_states")
        return diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, d.weights[js],
                              torch.stack([d.samples[j][1] for j in js]), torch.cat([d.samples[j][2] for j in js]),
                              added_cond_kwargs=cond or None, snr_gamma=run.cfg.snr_gamma,
                              mask=batch_mask(run.masks, [ex.image for ex in batch], [d.flipped[j] for j in js],
                                              tuple(latents.shape[1:])),
                              loss=run.cfg.loss, huber_delta=run.cfg.huber_delta, huber_schedule=run.cfg.huber_schedule)


def skip_nonfinite(run: Run, bad: float) -> None:
    """A non-finite loss: stop with the last good checkpoint, or (--skip-nonfinite) drop the batch."""
    if not run.cfg.skip_nonfinite:
        kept = list_checkpoints(run.ckpt_root)
        raise AdaptError(
            f"the loss became {bad} at step {run.step + 1}; stopped before it reached the weights"
            f" ({'last good checkpoint: ' + str(kept[-1]) if kept else 'no checkpoint was written'})."
            " Likely causes: fp16 overflow (use --mixed-precision bf16 or no), a too high --lr;"
            " --skip-nonfinite skips such batches instead")
    run.skipped += 1
    log.warning("non-finite loss at step %d: batch skipped (%d so far)", run.step + 1, run.skipped)
    run.optimizer.zero_grad(set_to_none=True)


def record(run: Run, loss: float, last: float, bar, stop) -> float:
    """After an optimizer step: validation loss, metrics, checkpoint, graceful stop, validation renders, progress bar.
    `last` is when the previous step ended; returns when this one did."""
    cfg, acc = run.cfg, run.accelerator
    run.method.after_step(run.components)
    run.step += 1
    if run.ema:
        run.ema.update(run.step)
    now = time.perf_counter()
    run.step_seconds.append(now - last)
    run.losses.append(loss)
    lr = run.lr_scheduler.get_last_lr()[0]
    val = {"val_loss": v} if (v := measure(run, chunk_loss)) is not None else {}  # before the checkpoint: --keep-best
    if cfg.log_with:
        acc.log({"loss": loss, "lr": lr, **val}, step=run.step)
    saved = None
    if acc.is_main_process:
        append_metrics(run.metrics_path, run.step, loss, lr, **val)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0 and run.step < cfg.steps:
            saved = checkpoint(run)
    stop.check(acc, run.step, cfg.steps, saved, lambda: checkpoint(run))  # SIGTERM/SIGINT: checkpoint, then Stopped
    if cfg.validation_every and run.step % cfg.validation_every == 0 and run.step < cfg.steps:
        validate(run, f"step-{run.step:06d}")
    acc.wait_for_everyone()
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    bar.update(1)
    return now


def checkpoint(run: Run) -> Path:
    return save_checkpoint(run.ckpt_root, run.step, run.named_params, run.optimizer, run.lr_scheduler,
                           run.accelerator.scaler, run.generators,
                           {"losses": run.losses, "pending": run.order.pending, "recipe": run.recipe, "world": run.world,
                            "skipped": run.skipped, **loop_state(run)}, run.cfg.keep_checkpoints, run.ema and run.ema.shadow, protected(run))


def validate(run: Run, tag: str, final: bool = False) -> None:
    """Render the validation prompts (main process) with the weights that are saved: a schedule-free
    optimizer's averaged ones (every process switches; mid-run, back to the exact training weights)."""
    acc = run.accelerator
    if not run.cfg.validation_prompt:
        return
    kept = None if final else eval_weights(run)
    if acc.is_main_process:
        with swapped(run.ema):  # with --ema-decay, the images show the average that is saved
            render_validation(run.components, run.method, [acc.unwrap_model(m) for m in run.modules], run.cfg,
                              run.out_dir / "validation" / f"{tag}.png", acc)
    train_weights(run, kept)


def finish(run: Run, seconds: float) -> dict:
    """Final validation; the method saves its artifact (with --ema-decay, of the averaged weights); loss
    curve and report.md. With a schedule-free optimizer both use its averaged weights, which the components keep."""
    acc, c = run.accelerator, run.components
    acc.wait_for_everyone()
    eval_weights(run, keep=False)
    validate(run, "final", final=True)
    best = summarize(run)  # validation.json
    for n, m in zip(run.method.trainable_modules, run.modules):
        setattr(c, n, acc.unwrap_model(m))
    if acc.is_main_process:
        save_artifact(run.method, c, run.out_dir, run.recipe or {}, run.ema, run.cfg.save_ema == "both")
        plot_losses(run.losses, run.out_dir / "loss.png", run.validation.losses if run.validation else None)
        write_report(run.out_dir, run.recipe or {}, run.losses, seconds, run.skipped, best)
    acc.end_training()
    return {"losses": run.losses, "steps": run.step, "seconds": seconds, "skipped": run.skipped,
            "step_seconds": run.step_seconds, "validation": best}
