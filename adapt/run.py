"""A training run's state (`Run`) and how it is set up: the accelerator, the trainable parameters
and where every weight lives, the caches, the optimizer and LR schedule (optim.py), and resuming
from a checkpoint. train.py steps a `Run`; nothing here runs a training step."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, set_seed

from .checkpoint import resume
from .data import BatchOrder, Example, target_size
from .diskcache import DiskCache, cache_root
from .ema import make_ema
from .encode import LatentCache, TextCache, release, size_conditions
from .errors import AdaptError
from .fileio import CHECKPOINTS_DIR
from .masks import latent_masks
from .optim import make_schedule, unwrapped
from .precision import choose_for, recasts
from .train_config import TrainConfig
from .validation import HeldOut, fixed_set, restore

log = logging.getLogger("adapt")
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """What the loop carries from step to step. `modules` are the trainable modules as accelerate
    wraps them; `generators` hold all randomness (order: batches; data: flips and caption
    dropout; tags, only with --shuffle-tags / --tag-dropout: caption tags; step: latent samples,
    noise, timesteps)."""

    cfg: TrainConfig
    components: Any
    method: Any
    examples: list[Example]
    out_dir: Path
    recipe: dict | None
    random_flip: bool
    accelerator: Any
    params: list
    modules: list
    optimizer: Any
    lr_scheduler: Any
    named_params: dict
    order: BatchOrder
    generators: dict
    latents: LatentCache
    texts: TextCache
    masks: dict = field(default_factory=dict)  # image -> its loss mask at the latent size (masks.py)
    validation: HeldOut | None = None  # the held-out images' fixed set and validation losses (validation.py)
    step: int = 0
    losses: list[float] = field(default_factory=list)
    skipped: int = 0
    step_seconds: list[float] = field(default_factory=list)
    ema: Any = None  # the moving average of the trainable weights (ema.py), on the main process, with --ema-decay

    @property
    def ckpt_root(self) -> Path:
        return self.out_dir / CHECKPOINTS_DIR

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    @property
    def world(self) -> dict:
        """What a checkpoint's global batch depends on (a resumed run must match it)."""
        a = self.accelerator
        return {"num_processes": a.num_processes, "batch_size": self.cfg.batch_size, "grad_accum": self.cfg.grad_accum,
                "device": a.device.type}


def setup(components, method, examples: list[Example], cfg: TrainConfig, out_dir: Path, *, resolution: int,
          random_flip: bool, bucket_step: int | None, recipe: dict | None, progress: bool,
          mask_from_alpha: bool = False, validation: list[Example] | None = None) -> Run:
    """Everything before the first step, in this order (the seeded draws depend on it). The
    `validation` examples (held out, validation.py) are cached with the training examples."""
    held = list(validation or [])
    if not examples:
        raise AdaptError("no training examples; pass --images DIR with at least one image")
    cfg = settle_precision(cfg, components)
    accelerator = make_accelerator(cfg, out_dir)
    set_seed(cfg.seed)
    params = trainable_parameters(components, method, cfg, accelerator.device)
    sizes = {ex.image: target_size(ex, resolution, bucket_step) for ex in examples + held}
    latents, texts = make_caches(components, method, examples + held, cfg, sizes, accelerator, random_flip, progress)
    n_proc = accelerator.num_processes
    optimizer, lr_scheduler = make_schedule(cfg, method, components, params, n_proc)
    modules = [getattr(components, n) for n in method.trainable_modules]
    *modules, optimizer, lr_scheduler = accelerator.prepare(*modules, optimizer, lr_scheduler)
    for n, m in zip(method.trainable_modules, modules):
        m.train()
        setattr(components, n, m)
    trainable = {id(p) for p in params}
    named_params = {f"{n}.{k}": p for n in method.trainable_modules
                    for k, p in accelerator.unwrap_model(getattr(components, n)).named_parameters() if id(p) in trainable}
    order = BatchOrder([ex.group for ex in examples], cfg.batch_size, cfg.seed,
                       keys=[sizes[ex.image] for ex in examples] if bucket_step else None, num_processes=n_proc)
    generators = {
        "order": order.generator,
        "data": torch.Generator().manual_seed(cfg.seed + 1),  # flips, caption dropout
        # The step's randomness (latent sample, noise, timesteps) has its own generator, so it does
        # not depend on whether modules that ran in between (text encoder, VAE) drew random numbers.
        "step": torch.Generator(accelerator.device).manual_seed(cfg.seed + 2),
    }
    if cfg.varies_tags:  # only then: checkpoints and draws of runs without these options are unchanged
        generators["tags"] = torch.Generator().manual_seed(cfg.seed + 3)
    run = Run(cfg, components, method, examples, Path(out_dir), recipe, random_flip, accelerator, params, modules,
              optimizer, lr_scheduler, named_params, order, generators, latents, texts,
              latent_masks([ex.image for ex in examples + held], sizes, latents.factor, mask_from_alpha),
              validation=fixed_set(held, latents, cfg, components.noise_scheduler, accelerator.device) if held else None)
    run.ema = make_ema(cfg, named_params) if accelerator.is_main_process else None  # it saves; the others need none
    if cfg.resume:
        loop = resume(run.ckpt_root, cfg.resume, named_params, optimizer, lr_scheduler, accelerator.scaler, generators,
                      run.world, recipe, run.ema and run.ema.shadow)
        run.step, run.losses, order.pending = loop["step"], loop["losses"], loop["pending"]
        run.skipped = loop.get("skipped", 0)  # non-finite batches skipped before the checkpoint (report.md counts all)
        restore(run, loop)
    if callable(getattr(unwrapped(optimizer), "train", None)):
        unwrapped(optimizer).train()  # schedule-free steps only in train mode (a checkpoint's state is already in it)
    return run


def settle_precision(cfg: TrainConfig, components) -> TrainConfig:
    """The config with --mixed-precision auto resolved for this device and UNet (precision.py), logged."""
    unet_params = sum(p.numel() for p in components.unet.parameters())
    precision, why = choose_for(cfg.mixed_precision, PartialState().device, unet_params)
    log.info("precision: %s (%s)", "fp32" if precision == "no" else precision, why)
    return cfg if precision == cfg.mixed_precision else replace(cfg, mixed_precision=precision)


def make_accelerator(cfg: TrainConfig, out_dir: Path) -> Accelerator:
    # accelerate keeps one process-wide state; reset its precision part so several runs (tests,
    # notebooks) can use different --mixed-precision in one process. The distributed part stays.
    AcceleratorState._reset_state()
    if cfg.log_with == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (lazy: optional, only for --log-with tensorboard)
        except ImportError:
            raise AdaptError("--log-with tensorboard needs the tensorboard package: pip install tensorboard") from None
    return Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[autocast_kwargs(cfg)],
                       log_with=cfg.log_with, project_dir=str(Path(out_dir) / "logs") if cfg.log_with else None)


def autocast_kwargs(cfg: TrainConfig) -> AutocastKwargs:
    """With the weight recast (precision.py), autocast's cast cache is off: it would keep every cast copy until the
    outermost autocast block ends (the end of forward), and accelerate wraps the prepared model's forward in an
    autocast of its own, which turns the cache back on unless told here."""
    return AutocastKwargs(cache_enabled=False) if recasts(cfg) else AutocastKwargs()


def trainable_parameters(c, method, cfg: TrainConfig, device) -> list:
    """Let the method add its weights, then place every module and return the parameters that train."""
    method.prepare(c)
    params = [p for p in method.trainable_parameters(c) if p.requires_grad]
    if not params:
        raise AdaptError("the method has no trainable parameters")
    check_precision(cfg.mixed_precision, device)
    place_for_training(c, {id(p) for p in params}, device, DTYPES[cfg.mixed_precision])
    if cfg.gradient_checkpointing:
        for name in method.trainable_modules:
            m = getattr(c, name)
            (m.enable_gradient_checkpointing if hasattr(m, "enable_gradient_checkpointing") else m.gradient_checkpointing_enable)()
    if cfg.channels_last:
        c.unet.to(memory_format=torch.channels_last)
    if cfg.compile:
        c.unet.compile()  # in place: the module, its parameter names and what saves it stay the same
    return params


def check_precision(mixed_precision: str, device) -> None:
    if mixed_precision == "fp16" and device.type == "cpu":
        raise AdaptError("fp16 mixed precision needs a GPU (accelerate has no fp16 autocast on CPU); use --mixed-precision bf16 or no")


def place_for_training(components, trainable: set[int], device, weight_dtype) -> None:
    """Move modules to the device. Frozen weights take the mixed-precision dtype; trainable ones stay
    fp32 master weights (so fp16 training never hits "Attempting to unscale FP16 gradients"). The
    VAE stays fp32: it encodes once per image, and fp16 VAEs are a known source of NaN latents."""
    for name in (*components.text_encoder_names, "unet", "vae"):
        module = getattr(components, name)
        module.to(device)
        for p in module.parameters():
            p.data = p.data.to(torch.float32 if (id(p) in trainable or name == "vae") else weight_dtype)


def make_caches(c, method, examples: list[Example], cfg: TrainConfig, sizes: dict, accelerator, random_flip: bool,
                progress: bool) -> tuple[LatentCache, TextCache]:
    """The VAE output per (image, flip) and the text encoder output per distinct prompt, cached as
    asked (and on disk, --disk-cache); a cached module is then released, unless validation
    rendering needs it. A trained text encoder is never cached."""
    keep_frozen = bool(cfg.validation_prompt)
    root = cache_root(cfg.cache_dir) if cfg.disk_cache else None
    latents = LatentCache(c, sizes, accelerator.device)
    if cfg.cache_latents:
        latents.fill(list(dict.fromkeys(ex.image for ex in examples)), (False, True) if random_flip else (False,),
                     show=progress and accelerator.is_main_process,
                     disk=root and DiskCache(root, "latents", accelerator.device))
        if not keep_frozen:
            release(c, "vae")
    prompts = sorted({ex.prompt for ex in examples} | ({""} if cfg.caption_dropout else set()))
    texts = TextCache(c, method, prompts, size_conditions(c, examples, sizes), accelerator.device)
    if cfg.cache_text and cfg.varies_tags:
        log.info("--shuffle-tags / --tag-dropout: captions change every step, so the text cache is off "
                 "(the text encoder stays loaded and encodes each step's captions)")
    elif cfg.cache_text and not set(c.text_encoder_names) & set(method.trainable_modules):
        texts.fill(accelerator, disk=root and DiskCache(root, "text", accelerator.device))
        if not keep_frozen:
            for name in c.text_encoder_names:
                release(c, name)
    return latents, texts


def eval_weights(run: Run, keep: bool = True) -> list | None:
    """Schedule-free optimizers train at one point (y) and are evaluated at another (x, the average of
    their iterates): switch the trainable weights to x for validation and saving. Returns copies of
    the training weights for `train_weights` (with `keep`); None for other optimizers (nothing to do).
    Checkpoints keep the training weights and the optimizer's state as they are: exact to resume, and
    no process's weights change because only the main process saves."""
    sf = unwrapped(run.optimizer)
    if not callable(getattr(sf, "eval", None)):
        return None
    kept = [p.detach().to("cpu", copy=True) for p in run.params] if keep else None
    sf.eval()
    run.method.after_step(run.components)  # textual inversion: the rows it does not train stay the base's
    return kept


def train_weights(run: Run, kept: list | None) -> None:
    """Back to training after eval_weights: the exact weights from before (a copy; the optimizer's own
    x -> y would round them, and validation would change the training)."""
    if kept is not None:
        unwrapped(run.optimizer).train()
        with torch.no_grad():
            for p, k in zip(run.params, kept):
                p.copy_(k)
