"""`--dry-run`: everything a run would resolve, printed, and nothing trained or written.

The settings with where each came from (plan.describe), the data (images, class images, steps,
epochs, resolution) and an estimate of peak memory and time per step on this device
(adapt/estimate.py, calibrated against measured runs by benchmarks/estimate.py).
"""

from __future__ import annotations

import torch

from .data import instance_examples
from .estimate import choose_fused_backward, estimate
from .models import native_resolution, resolve_model
from .plan import Plan
from .precision import choose_for_model
from .recipe import describe

def device_name() -> tuple[str, str]:
    """("cuda" | "cpu", the GPU's name or "")."""
    if torch.cuda.is_available():
        return "cuda", torch.cuda.get_device_name(0)
    return "cpu", ""


def dry_run(plan: Plan) -> list[str]:
    """The lines `--dry-run` prints."""
    data, cfg, db = plan.configs["data"], plan.configs["train"], plan.configs.get("dreambooth")
    if data.dataset:
        n = f"a dataset ({data.dataset}; its images are counted when the run reads it)"
        count = None
    else:
        count = len(instance_examples(data.images, data.token, plan.template, data.class_word))
        n = f"{count} images in {data.images}"
    model = resolve_model(plan.model)
    resolution = data.resolution or native_resolution(model)
    prior = bool(db is not None and db.prior_preservation)
    per_step = cfg.batch_size * cfg.grad_accum * cfg.num_processes
    lines = [f"dry run of `adapt {plan.command}`: nothing is trained or written", "settings (value <- where it came from):",
             *describe(plan.configs, plan.sources), "data:", f"  model {model}", f"  {n}" + (f"; {db.num_class_images} class images (prior preservation)" if prior else ""),
             f"  {cfg.steps} steps x {per_step} images = " + (f"{cfg.steps * per_step / count:.1f} epochs" if count else "?")
             + f" at {resolution} px -> {plan.output}"]
    return lines + estimate_lines(plan, model, resolution, prior)


def estimate_lines(plan: Plan, model, resolution: int, prior: bool) -> list[str]:
    cfg = plan.configs["train"]
    kind = plan.spec.load().estimate_kind
    lora = plan.configs.get("lora")
    device, gpu = device_name()
    try:
        precision, why = choose_for_model(cfg.mixed_precision, device, model)
        est = estimate(model, kind=kind, resolution=resolution, batch=cfg.batch_size, precision=precision,
                       optimizer=cfg.optimizer, targets=tuple(lora.target_modules) if lora else (), rank=lora.rank if lora else 4,
                       checkpointing=cfg.gradient_checkpointing, device=device, gpu_name=gpu, prior=prior,
                       keep_encoders=not cfg.cache_latents or bool(cfg.validation_prompt),
                       ema=cfg.ema_decay > 0 and not cfg.ema_on_cpu,
                       fused=lambda n_train: choose_fused_backward(cfg, n_train, cfg.num_processes, precision)[0])
    except (OSError, KeyError, ValueError) as e:
        return [f"estimate: not available for this model ({e})"]
    where = f"{device}{f' ({gpu})' if gpu else ''}, {precision if precision != 'no' else 'fp32'} ({why})"
    parts = ", ".join(f"{k} {v / 2**20:.0f}" for k, v in est.parts.items())
    total = est.seconds_per_step * cfg.steps * cfg.grad_accum
    note = "calibrated on measured CPU runs" if est.calibrated else "UNCALIBRATED: spec-sheet throughput, no run on this GPU measured"
    return ["estimate (" + where + f"; {note}):",
            f"  peak memory ~{est.peak_bytes / 2**30:.2f} GiB (MiB: {parts})",
            f"  ~{est.seconds_per_step:.2f} s per micro-step, ~{total / 60:.1f} min for the run (plus loading and caching)"]
