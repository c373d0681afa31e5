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
"""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from pathlib import Path
from typing import Iterable

from .config import TrainConfig
from .checkpoint import list_checkpoints, resume, save_checkpoint
from .data import BatchOrder, Example, crop_geometry, load_pixels, loss_weights, target_size
from .errors import AdaptError
from .signals import graceful_stop

log = logging.getLogger("adapt")


def diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, loss_weight, noise, timesteps, *,
                   added_cond_kwargs=None, snr_gamma=None):
    """Weighted per-sample MSE between the UNet's prediction and the epsilon / velocity target;
    with snr_gamma, each sample's MSE is also weighted by min-SNR (min(SNR, gamma) / SNR for
    epsilon, / (SNR + 1) for v-prediction; diffusers' compute_snr)."""
    import torch
    import torch.nn.functional as F

    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise AdaptError(f"the model's scheduler uses prediction_type={kind!r}; adapt trains 'epsilon' and 'v_prediction' models")
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                      return_dict=False)[0]
    per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, timesteps).float()
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        per_sample = per_sample * (clipped / (snr + 1) if kind == "v_prediction" else clipped / snr)
    return (per_sample * loss_weight.to(per_sample.device)).sum()


def _optimizer(cfg: TrainConfig, params):
    import torch

    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except Exception as e:  # ImportError, or a bitsandbytes build without this device's kernels
            raise AdaptError(f"--optimizer adamw8bit needs a working bitsandbytes ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                             "install a build for your GPU or use --optimizer adamw") from None
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def place_for_training(components, trainable: set[int], device, weight_dtype) -> None:
    """Move modules to the device. Frozen weights take the mixed-precision dtype; trainable ones stay
    fp32 master weights (so fp16 training never hits "Attempting to unscale FP16 gradients"). The
    VAE stays fp32: it encodes once per image, and fp16 VAEs are a known source of NaN latents."""
    import torch

    for name in (*components.text_encoder_names, "unet", "vae"):
        module = getattr(components, name)
        module.to(device)
        for p in module.parameters():
            p.data = p.data.to(torch.float32 if (id(p) in trainable or name == "vae") else weight_dtype)


def _release(components, name: str) -> None:
    """Drop a frozen module whose outputs are cached, so its memory is free for training."""
    import torch

    setattr(components, name, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@graceful_stop
def train(components, method, examples: list[Example], cfg: TrainConfig, out_dir: str | Path, *,
          resolution: int, random_flip: bool = False, bucket_step: int | None = None, recipe: dict | None = None,
          progress: bool = True, stop=None) -> dict:
    """Train `method` on `examples`; write metrics.jsonl, loss.png, report.md and the method's
    artifact to out_dir. Runs as one process or as one of several (accelerate launch): every
    process draws the randomness of the whole global batch and trains on its share, so N
    processes x batch B equal one process x batch N*B. SIGTERM/SIGINT: see signals.py."""
    import contextlib

    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from .models import encode_prompts, size_conditioning

    if not examples:
        raise AdaptError("no training examples; pass --images DIR with at least one image")
    out_dir = Path(out_dir)
    # accelerate keeps one process-wide state; reset its precision part so several runs (tests,
    # notebooks) can use different --mixed-precision in one process. The distributed part stays.
    AcceleratorState._reset_state()
    if cfg.log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise AdaptError("--log-with tensorboard needs the tensorboard package: pip install tensorboard") from None
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              log_with=cfg.log_with, project_dir=str(out_dir / "logs") if cfg.log_with else None)
    set_seed(cfg.seed)
    device, n_proc, rank = accelerator.device, accelerator.num_processes, accelerator.process_index
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    c = components

    method.prepare(c)
    params = [p for p in method.trainable_parameters(c) if p.requires_grad]
    if not params:
        raise AdaptError("the method has no trainable parameters")
    trainable = {id(p) for p in params}
    if cfg.mixed_precision == "fp16" and device.type == "cpu":
        raise AdaptError("fp16 mixed precision needs a GPU (accelerate has no fp16 autocast on CPU); use --mixed-precision bf16 or no")
    place_for_training(c, trainable, device, weight_dtype)
    if cfg.gradient_checkpointing:
        for name in method.trainable_modules:
            m = getattr(c, name)
            (m.enable_gradient_checkpointing if hasattr(m, "enable_gradient_checkpointing") else m.gradient_checkpointing_enable)()

    # --- sizes (square or aspect-ratio buckets) and caches: VAE output per (image, flip), text
    # encoder output per distinct prompt. Validation rendering needs both modules, so it keeps them.
    sizes = {ex.image: target_size(ex, resolution, bucket_step) for ex in examples}
    scaling_factor = c.vae.config.scaling_factor
    vae_factor = 2 ** (len(c.vae.config.block_out_channels) - 1)
    latent_channels = c.vae.config.latent_channels
    flips = (False, True) if random_flip else (False,)
    keep_frozen = bool(cfg.validation_prompt)

    @torch.no_grad()
    def encode(batch: list[Example], flipped: list[bool]):
        pixels = torch.stack([load_pixels(ex, sizes[ex.image], f) for ex, f in zip(batch, flipped)]).to(device)
        return c.vae.encode(pixels).latent_dist.parameters  # mean and logvar; sampled every step

    latent_cache: dict[tuple[Path, bool], torch.Tensor] = {}
    if cfg.cache_latents:
        for image in tqdm(list(dict.fromkeys(ex.image for ex in examples)), desc="caching latents",
                          disable=not (progress and accelerator.is_main_process), leave=False):
            for f in flips:
                latent_cache[(image, f)] = encode([Example(image, "")], [f])[0]
        if not keep_frozen:
            _release(c, "vae")

    prompts = sorted({ex.prompt for ex in examples} | ({""} if cfg.caption_dropout else set()))
    input_ids = {p: method.tokenize(c, p) for p in prompts}
    text_cache: dict[str, dict] = {}
    if cfg.cache_text and not set(c.text_encoder_names) & set(method.trainable_modules):
        with torch.no_grad(), accelerator.autocast():
            for p in prompts:
                text_cache[p] = {k: v[0] for k, v in encode_prompts(c, input_ids[p].to(device)).items()}
        if not keep_frozen:
            for name in c.text_encoder_names:
                _release(c, name)
    # SDXL's size conditioning per image (original size, crop, target); empty for SD 1.x/2.x
    size_cond = {ex.image: size_conditioning(c, *crop_geometry(ex, sizes[ex.image]), sizes[ex.image][::-1])
                 for ex in examples} if c.is_sdxl else {}

    optimizer = _optimizer(cfg, params)
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.warmup_steps * n_proc,
                                 num_training_steps=cfg.steps * n_proc)
    modules = [getattr(c, n) for n in method.trainable_modules]
    *modules, optimizer, lr_scheduler = accelerator.prepare(*modules, optimizer, lr_scheduler)
    for n, m in zip(method.trainable_modules, modules):
        m.train()
        setattr(c, n, m)
    named_params = {f"{n}.{k}": p for n in method.trainable_modules
                    for k, p in accelerator.unwrap_model(getattr(c, n)).named_parameters() if id(p) in trainable}

    order = BatchOrder([ex.group for ex in examples], cfg.batch_size, cfg.seed,
                       keys=[sizes[ex.image] for ex in examples] if bucket_step else None, num_processes=n_proc)
    generators = {
        "order": order.generator,
        "data": torch.Generator().manual_seed(cfg.seed + 1),  # flips, caption dropout
        # The step's randomness (latent sample, noise, timesteps) has its own generator, so it does
        # not depend on whether modules that ran in between (text encoder, VAE) drew random numbers.
        "step": torch.Generator(device).manual_seed(cfg.seed + 2),
    }
    data_rng, step_rng = generators["data"], generators["step"]
    ckpt_root = out_dir / "checkpoints"
    step, losses = 0, []
    world = {"num_processes": n_proc, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum, "device": device.type}
    if cfg.resume:
        loop = resume(ckpt_root, cfg.resume, named_params, optimizer, lr_scheduler, accelerator.scaler, generators, world, recipe)
        step, losses, order.pending = loop["step"], loop["losses"], loop["pending"]

    def checkpoint() -> Path:
        return save_checkpoint(ckpt_root, step, named_params, optimizer, lr_scheduler, accelerator.scaler, generators,
                               {"losses": losses, "pending": order.pending, "recipe": recipe, "world": world}, cfg.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in _metric_rows(metrics_path, step)))
    if cfg.log_with:
        accelerator.init_trackers("adapt", config=_scalars(recipe or {}))

    def validate(tag: str) -> None:
        if cfg.validation_prompt and accelerator.is_main_process:
            render_validation(c, method, [accelerator.unwrap_model(m) for m in modules], cfg, out_dir / "validation" / f"{tag}.png",
                              accelerator)

    T = c.noise_scheduler.config.num_train_timesteps
    bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=not (progress and accelerator.is_main_process))
    start = last = time.perf_counter()
    running, skipped, step_seconds = 0.0, 0, []
    while step < cfg.steps:
        batch = [examples[i] for i in order.next()]  # the global batch, in the same order on every process
        flipped = [bool(random_flip and torch.rand((), generator=data_rng) < 0.5) for _ in batch]
        dropped = [bool(cfg.caption_dropout and torch.rand((), generator=data_rng) < cfg.caption_dropout) for _ in batch]
        batch_prompts = ["" if d else ex.prompt for ex, d in zip(batch, dropped)]
        weights = loss_weights(batch) * n_proc  # DDP averages gradients over processes; x N makes it the global sum
        draws = []  # per sample, in global order: latent sample, noise, timestep
        for ex in batch:
            w, h = sizes[ex.image]
            shape = (latent_channels, h // vae_factor, w // vae_factor)
            eps = torch.randn(shape, generator=step_rng, device=device)
            noise = torch.randn(shape, generator=step_rng, device=device)
            if cfg.noise_offset:
                noise = noise + cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=step_rng, device=device)
            draws.append((eps, noise, torch.randint(0, T, (1,), generator=step_rng, device=device)))
        chunks: dict[tuple, list[int]] = {}  # this process's share, one forward per image size
        for j in order.local(list(range(len(batch))), rank):
            chunks.setdefault(tuple(draws[j][0].shape), []).append(j)
        value, bad = 0.0, False
        with accelerator.accumulate(*modules):
            for k, js in enumerate(chunks.values()):
                with contextlib.ExitStack() as sync:
                    if k < len(chunks) - 1:  # gradients are all-reduced once, after the last image size
                        for m in modules:
                            sync.enter_context(accelerator.no_sync(m))
                    if cfg.cache_latents:
                        params_ = torch.stack([latent_cache[(batch[j].image, flipped[j])] for j in js])
                    else:
                        params_ = encode([batch[j] for j in js], [flipped[j] for j in js])
                    dist = DiagonalGaussianDistribution(params_)
                    latents = (dist.mean + dist.std * torch.stack([draws[j][0] for j in js]).to(dist.mean.dtype)) * scaling_factor
                    with accelerator.autocast():
                        if text_cache:
                            cond = {key: torch.stack([text_cache[batch_prompts[j]][key] for j in js]) for key in text_cache[batch_prompts[js[0]]]}
                        else:
                            cond = encode_prompts(c, torch.cat([input_ids[batch_prompts[j]] for j in js]).to(device))
                        if size_cond:
                            cond["time_ids"] = torch.stack([size_cond[batch[j].image]["time_ids"] for j in js]).to(device)
                        hidden = cond.pop("encoder_hidden_states")
                        loss = diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, weights[js],
                                              torch.stack([draws[j][1] for j in js]), torch.cat([draws[j][2] for j in js]),
                                              added_cond_kwargs=cond or None, snr_gamma=cfg.snr_gamma)
                    part = accelerator.reduce(loss.detach().float(), reduction="mean").item()
                    if not math.isfinite(part):  # checked before backward: a bad batch never reaches the weights
                        bad = part
                        break
                    value += part
                    accelerator.backward(loss)
            if bad is not False:
                if not cfg.skip_nonfinite:
                    kept = list_checkpoints(ckpt_root)
                    raise AdaptError(
                        f"the loss became {bad} at step {step + 1}; stopped before it reached the weights"
                        f" ({'last good checkpoint: ' + str(kept[-1]) if kept else 'no checkpoint was written'})."
                        " Likely causes: fp16 overflow (use --mixed-precision bf16 or no), a too high --lr;"
                        " --skip-nonfinite skips such batches instead")
                skipped += 1
                log.warning("non-finite loss at step %d: batch skipped (%d so far)", step + 1, skipped)
                optimizer.zero_grad(set_to_none=True)
                continue
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        running += value / cfg.grad_accum
        if not accelerator.sync_gradients:
            continue
        method.after_step(c)
        step += 1
        now = time.perf_counter()
        step_seconds.append(now - last)
        last = now
        losses.append(running)
        lr = lr_scheduler.get_last_lr()[0]
        if cfg.log_with:
            accelerator.log({"loss": running, "lr": lr}, step=step)
        saved = None
        if accelerator.is_main_process:
            with metrics_path.open("a") as f:
                f.write(json.dumps({"step": step, "loss": running, "lr": lr}) + "\n")
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                saved = checkpoint()
        stop.check(accelerator, step, cfg.steps, saved, checkpoint)  # SIGTERM/SIGINT: checkpoint, then Stopped
        if cfg.validation_every and step % cfg.validation_every == 0 and step < cfg.steps:
            validate(f"step-{step:06d}")
        accelerator.wait_for_everyone()
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2e}")
        bar.update(1)
        running = 0.0
    bar.close()
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    validate("final")
    for n, m in zip(method.trainable_modules, modules):
        setattr(c, n, accelerator.unwrap_model(m))
    if accelerator.is_main_process:
        method.save(c, out_dir, recipe or {})
        plot_losses(losses, out_dir / "loss.png")
        write_report(out_dir, recipe or {}, losses, seconds, skipped)
    accelerator.end_training()
    return {"losses": losses, "steps": step, "seconds": seconds, "skipped": skipped, "step_seconds": step_seconds}


def render_validation(c, method, trained_modules, cfg: TrainConfig, path: Path, accelerator) -> None:
    """Render the validation prompts with the model as it is now, through the inference module
    (fixed seeds, dpm++2m-karras), as one grid."""
    import torch
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from .images import make_grid, save_image
    from .infer import DEFAULT_SCHEDULER, generate
    from .schedulers import make_scheduler

    if c.vae is None or c.text_encoder is None:
        raise AdaptError("validation needs the VAE and text encoder; they were released")
    parts = {"vae": c.vae, "unet": c.unet, "scheduler": make_scheduler(DEFAULT_SCHEDULER, c.noise_scheduler.config),
             **{n: getattr(c, n) for n in c.text_encoder_names},
             **{n.replace("text_encoder", "tokenizer"): t for n, t in zip(c.text_encoder_names, c.tokenizers)}}
    parts.update({n: accelerator.unwrap_model(getattr(c, n)) for n in method.trainable_modules})
    if c.is_sdxl:
        pipe = StableDiffusionXLPipeline(**parts)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    for m in trained_modules:
        m.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            prompts = [method.prompt(p) for p in cfg.validation_prompt]
            images = generate(pipe, prompts, [cfg.seed] * len(prompts), steps=cfg.validation_steps)
    finally:
        for m in trained_modules:
            m.train()
    save_image(make_grid(images), path)


def write_report(out_dir: Path, recipe: dict, losses: list[float], seconds: float, skipped: int) -> None:
    """report.md: what ran (recipe), how the loss went, and the validation grids."""
    from .fileio import atomic_path

    grids = sorted((out_dir / "validation").glob("*.png")) if (out_dir / "validation").is_dir() else []
    tail = losses[-max(1, len(losses) // 10):]
    lines = [f"# {recipe.get('method', 'adapt')} run", "",
             f"{len(losses)} steps in {seconds:.0f} s; loss {losses[0]:.4f} -> {sum(tail) / len(tail):.4f} "
             f"(mean of the last 10%){f'; {skipped} non-finite batches skipped' if skipped else ''}." if losses else "No steps.",
             "", "![loss](loss.png)", ""]
    if grids:
        lines += ["## Validation samples", ""] + [f"### {g.stem}\n\n![{g.stem}](validation/{g.name})\n" for g in grids]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines))


def _scalars(recipe: dict, prefix: str = "") -> dict:
    """Flatten a recipe to the scalar hyper-parameters trackers accept."""
    out = {}
    for k, v in recipe.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)):
            out[f"{prefix}{k}"] = v
    return out


def _metric_rows(path: Path, upto: int) -> list[dict]:
    """metrics.jsonl rows of steps <= upto (a resumed run continues the file; a new run empties it)."""
    if not upto or not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["step"] <= upto]


def plot_losses(losses: Iterable[float], path: Path, size=(640, 360)) -> None:
    """A dependency-free loss curve (raw + moving average) drawn with PIL."""
    from PIL import Image, ImageDraw

    from .images import save_image

    losses = list(losses)
    img = Image.new("RGB", size, "white")
    if len(losses) >= 2:
        d = ImageDraw.Draw(img)
        w, h, pad = size[0], size[1], 40
        lo, hi = min(losses), max(losses)
        span = (hi - lo) or 1.0
        k = max(1, len(losses) // 50)
        smooth = [sum(losses[max(0, i - k):i + 1]) / len(losses[max(0, i - k):i + 1]) for i in range(len(losses))]

        def xy(i, v):
            return pad + (w - 2 * pad) * i / (len(losses) - 1), h - pad - (h - 2 * pad) * (v - lo) / span

        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(180, 200, 230), width=1)
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
        d.rectangle([pad, pad, w - pad, h - pad], outline="black")
        d.text((pad, 10), f"loss: {losses[0]:.4f} -> {smooth[-1]:.4f} (avg), {len(losses)} steps", fill="black")
        d.text((4, pad - 6), f"{hi:.3g}", fill="black")
        d.text((4, h - pad - 6), f"{lo:.3g}", fill="black")
    save_image(img, path)
