"""The heavy part of a training run, once its Plan is made and its folder held: relaunch as N
processes (--num-processes), the training examples, class images, the method, the one loop."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys

import torch
from accelerate import PartialState

from . import __version__
from .classimages import ensure_class_images
from .data import Example, check_images, dataset_examples, instance_examples
from .errors import AdaptError
from .infer import default_guidance
from .models import load_components, native_resolution, resolve_model
from .precision import choose_for_model
from .recipe import describe, to_dict
from .report import validation_line
from .run import DTYPES, check_precision
from .signals import wait_forwarding
from .train import train
from .validation import held_out

log = logging.getLogger("adapt")


def run(plan) -> None:
    """Train `plan` (an adapt.plan.Plan) into plan.output."""
    data, train_cfg, db = plan.configs["data"], plan.configs["train"], plan.configs.get("dreambooth")
    if train_cfg.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(relaunch(train_cfg.num_processes))
    train_cfg.num_processes = int(os.environ.get("WORLD_SIZE", train_cfg.num_processes))  # as launched (also by accelerate launch)
    out = plan.output
    # Under a launcher, the first PartialState fixes the distributed setup for the process; on CPU
    # that needs cpu=True (accelerate's multi-CPU mode, which Accelerator reads from the same variable).
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    with state.main_process_first():  # one process writes dataset images and class images; the others reuse them
        if data.dataset:
            examples = dataset_examples(data.dataset, data.image_column, data.caption_column, data.token, data.class_word,
                                        out / "dataset")
        else:
            examples = instance_examples(data.images, data.token, plan.template, data.class_word)
        log.info("%d images from %s; e.g. prompt: %r", len(examples), data.dataset or data.images, examples[0].prompt)
        resolution = data.resolution or native_resolution(resolve_model(plan.model))
        examples = check_images(examples, resolution, data.skip_bad_images)
        examples, validation = held_out(examples, train_cfg, data, plan.template, resolution)  # before class images
        if db is not None and db.prior_preservation:
            precision, _ = choose_for_model(train_cfg.mixed_precision, state.device, resolve_model(plan.model))
            examples += class_examples(plan.model, data, db, resolution, precision, state.device)

    components = load_components(plan.model)
    method = plan.spec.load().from_configs(plan.configs)
    run_recipe = {"method": plan.command, "base_model": str(plan.model or "bundled"), "adapt_version": __version__,
                  **to_dict(*plan.configs.values())}
    run_recipe["data"]["resolution"] = resolution
    log.info("settings not at adapt's defaults (value <- where it came from; the run's recipe.json lists all):\n%s",
             "\n".join(describe(plan.configs, plan.sources, everything=False)))
    log.info("training %s for %d steps at %d px -> %s", plan.command, train_cfg.steps, resolution, out)
    result = train(components, method, examples, train_cfg, out, resolution=resolution, random_flip=data.random_flip,
                   mask_from_alpha=data.mask_from_alpha, bucket_step=data.bucket_step if data.buckets else None, recipe=run_recipe,
                   validation=validation)
    losses, k = result["losses"], max(1, len(result["losses"]) // 10)
    log.info("done in %.0f s: loss %.4f -> %.4f (mean of the first and last 10%% of steps); wrote %s", result["seconds"],
             sum(losses[:k]) / k, sum(losses[-k:]) / k, out)
    if result["validation"] and result["validation"]["best_step"] is not None:
        log.info("%s", validation_line(result["validation"]))


def class_examples(model, data, db, resolution: int, mixed_precision: str, device) -> list[Example]:
    """Prior preservation as data: class images are examples of group 1 weighted by lambda. They
    render at the model's guidance (its adapt.json, as `adapt generate` renders) in the run's precision; without one, in the inference module's default (fp16 on a GPU,
    as diffusers' train_dreambooth.py's prior_generation_precision; fp32 on CPU)."""
    if not (db.class_prompt or data.class_word):
        raise AdaptError("prior preservation needs --class-word (e.g. 'cat') or --class-prompt; "
                         "or pass --no-prior-preservation")
    check_precision(mixed_precision, device)  # before the class images, not after minutes of rendering
    class_prompt = db.class_prompt or f"a photo of {data.class_word}"
    _, files = ensure_class_images(model, class_prompt, db.num_class_images, resolution, scheduler=db.class_scheduler,
                                   steps=db.class_steps, guidance=default_guidance(model), folder=db.class_images,
                                   dtype=None if mixed_precision == "no" else DTYPES[mixed_precision])
    return [Example(p, class_prompt, weight=db.prior_loss_weight, group=1) for p in files]


def relaunch(num_processes: int) -> int:
    """Run this same command as N data-parallel processes: `accelerate launch --multi_gpu` on GPUs;
    on CPU torch's launcher with ACCELERATE_USE_CPU (accelerate's multi-CPU mode, gloo, no MPI).
    Returns the launcher's exit code."""
    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            argv.append(a)
    env = dict(os.environ)
    if torch.cuda.is_available():
        launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
                    "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = ["torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_addr", "127.0.0.1",
                    "--master_port", str(port)]
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", *launcher, "-m", "adapt", *argv]
    log.info("relaunching with %d processes: %s", num_processes, " ".join(cmd))
    return wait_forwarding(subprocess.Popen(cmd, env=env))  # SIGTERM reaches the workers: graceful stop
