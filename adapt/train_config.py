"""The [train] section of a run's configuration: `TrainConfig`, the loop's settings (steps, learning rates,
optimizer, precision, memory savers, loss, checkpoints, validation), declared as config.py declares the method
sections (`option`: one recipe key and one flag per field) and imported as lightly (the CLI builds it before torch)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .config import check_choice, option
from .errors import AdaptError
from .estimate import choose_fused_backward
from .logs import check_installed

log = logging.getLogger("adapt")

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "schedule-free-adamw")
OPTIMIZER_PACKAGES = {"prodigy": "prodigyopt", "schedule-free-adamw": "schedulefree"}  # optional: pip install "adapt[optimizers]"
PRECISIONS = ("auto", "no", "fp16", "bf16")
ADAMW_KERNELS = ("auto", "for", "foreach", "fused")
FUSED_BACKWARD = ("auto", "on", "off")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear")
LOSSES = ("mse", "huber", "smooth-l1")
HUBER_SCHEDULES = ("constant", "snr", "exponential")
SAVE_EMA = ("only", "both")


@dataclass
class TrainConfig:
    steps: int = option(500, "Optimizer steps (each is batch_size x grad_accum images).")
    batch_size: int = option(1, "Images per forward pass (with prior preservation, as many class images again).")
    grad_accum: int = option(1, "Gradient accumulation: micro-batches per optimizer step.")
    lr: float = option(1e-4, "Learning rate.")
    lr_scheduler: str = option("constant", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".")
    warmup_steps: int = option(0, "Linear warm-up steps of the learning-rate schedule (also with --lr-scheduler constant).")
    optimizer: str = option("adamw", "adamw (torch); adamw8bit (bitsandbytes: ~75% less optimizer memory, needs a GPU build); "
                        "prodigy (prodigyopt: estimates its own step size, --lr multiplies it and defaults to 1); "
                        "schedule-free-adamw (schedulefree: no LR schedule, --warmup-steps is its own warm-up; "
                        "validates and saves its averaged weights).")
    text_encoder_lr: float | None = option(None, "Learning rate of the text encoder's trainable weights (--train-text-encoder). Default: --lr.")
    embedding_lr: float | None = option(None, "Learning rate of the new token's embedding vectors. Default: --lr.")
    loraplus_ratio: float = option(1.0, "LoRA+: LoRA's B matrices learn at this many times the learning rate of the A matrices "
                               "(16 is the LoRA+ paper's choice; 1 = plain LoRA).")
    weight_decay: float = option(1e-2, "Weight decay (decoupled, as AdamW's, with every --optimizer).", recipe_only=True)
    max_grad_norm: float = option(1.0, "Clip the gradient norm to this value (0 disables).")
    mixed_precision: str = option("auto", "auto | no | fp16 | bf16. Frozen weights and activations in this dtype; trainable weights "
                              "stay fp32. auto: bf16 on GPUs of compute capability >= 8 and on CPUs with AMX/AVX512-BF16 "
                              "for SD-sized UNets, fp16 on older GPUs, else no (fp32); the run's first lines say which and why.")
    compile: bool = option(False, "torch.compile the UNet (inductor): the first steps are slow while it compiles.")
    channels_last: bool = option(False, "Keep the UNet's weights and activations in channels-last memory layout.")
    adamw_kernel: str = option("auto", "torch AdamW's implementation: for, foreach or fused; auto: fused where torch has it for "
                           "the device (CPU, CUDA) unless fp16, else torch's default.", recipe_only=True)
    fused_backward: str = option("auto", "Step each weight inside backward as soon as its gradient is complete, then free the gradient: a full "
                             "fine-tune never holds all gradients (SD 1.5: 3.2 GiB less); clipping is then per weight tensor. "
                             "auto: on for 100M+ trainable parameters with adamw/adamw8bit, one process, no --grad-accum, not fp16.")
    recast_weights: bool = option(True, "Under mixed precision, cast each trainable weight again in backward instead of keeping "
                              "autocast's low-precision copy from forward (same gradients; a full SD 1.5 fine-tune holds ~1.1 GiB "
                              "less). Off with --compile.", recipe_only=True)
    gradient_checkpointing: bool = option(False, "Recompute activations in backward: much less memory, ~20-30% slower.")
    cache_latents: bool = option(True, "Encode each image (and its flip) with the VAE once, then free the VAE.")
    cache_text: bool = option(True, "Encode each distinct prompt once when the text encoder is frozen, then free it.")
    disk_cache: bool = option(True, "Keep cached latents and text embeddings on disk, keyed by a hash of everything they depend on, so a later run on the same data skips encoding.")
    cache_dir: str | None = option(None, "Folder of the disk cache. Default: $ADAPT_CACHE_DIR, else $XDG_CACHE_HOME/adapt, else ~/.cache/adapt.", cli=Path)
    caption_dropout: float = option(0.0, "Probability of training a sample with an empty prompt (enables classifier-free guidance).")
    shuffle_tags: bool = option(False, "Shuffle each caption's comma-separated tags every step (the text cache is then off).")
    keep_tokens: int = option(0, "With --shuffle-tags / --tag-dropout: the first N tags of a caption stay in place and are never dropped.")
    tag_dropout: float = option(0.0, "Drop each tag of a caption (except the kept ones) with this probability every step (the text cache is then off).")
    seed: int = option(0, "Seed for noise, timesteps, data order and new weights.")
    checkpoint_every: int = option(0, "Save the full training state every N steps under OUTPUT/checkpoints (0 = never).")
    keep_checkpoints: int = option(2, "How many of the newest checkpoints to keep.")
    resume: str | None = option(None, "Continue a run: 'latest' (newest checkpoint in --output) or a checkpoint folder.")
    skip_nonfinite: bool = option(False, "Skip a batch whose loss is NaN/inf (logged) instead of stopping the run.")
    snr_gamma: float | None = option(None, "Min-SNR loss weighting with this gamma (5 is usual): faster, steadier convergence.")
    loss: str = option("mse", "Per-element loss: mse, huber (pseudo-Huber: quadratic below --huber-delta, linear above) or smooth-l1.")
    huber_delta: float = option(0.1, "huber / smooth-l1: the delta c where the loss turns from quadratic to linear (kohya's huber_c).")
    huber_schedule: str = option("constant", "huber / smooth-l1: delta over timesteps: constant, snr or exponential (kohya's huber_schedule).")
    noise_offset: float = option(0.0, "Add this much per-channel offset noise (0.05-0.1) so the model learns very dark/bright images.")
    ema_decay: float = option(0.0, "Keep an exponential moving average of the trained weights with this decay (e.g. 0.999; 0 = off) and save it as the artifact.")
    ema_on_cpu: bool = option(False, "Keep the moving average in CPU memory (no extra GPU memory for a full fine-tune; slower steps).")
    save_ema: str = option("only", "With --ema-decay: only (the artifact holds the averaged weights) or both (also the trained weights, in OUTPUT/raw).")
    log_with: str | None = option(None, "Also log to a tracker: tensorboard (logs under OUTPUT/logs).")
    validation_prompt: list[str] = option((), "Prompt rendered during training with a fixed seed (repeatable).")
    validation_every: int = option(0, "Every N steps: render the validation prompts, compute the validation loss (0 = only at the end).")
    validation_steps: int = option(25, "Denoising steps (dpm++2m-karras) for validation images.")
    validation_split: float = option(0.0, "Hold out this fraction of the instance images (at least one, chosen by --seed; never trained on) for a validation loss at fixed noise and timesteps: instance images only, no class images or prior term.")
    validation_images: str | None = option(None, "Folder of held-out images for the validation loss, instead of --validation-split (captions as for --images).", cli=Path)
    keep_best: bool = option(False, "With a validation set and --checkpoint-every: also keep the checkpoint with the lowest validation loss (measured at every checkpoint too).")
    num_processes: int = option(1, "Data-parallel processes (relaunches itself with `accelerate launch`).")

    def __post_init__(self):
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("mixed precision", self.mixed_precision, PRECISIONS)
        check_choice("AdamW kernel", self.adamw_kernel, ADAMW_KERNELS)
        check_choice("--fused-backward value", self.fused_backward, FUSED_BACKWARD)
        check_choice("lr scheduler", self.lr_scheduler, LR_SCHEDULERS)
        check_choice("loss", self.loss, LOSSES)
        check_choice("huber schedule", self.huber_schedule, HUBER_SCHEDULES)
        self._check_group_lrs()
        if self.huber_delta <= 0:
            raise AdaptError(f"--huber-delta must be > 0, got {self.huber_delta}")
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise AdaptError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise AdaptError(f"--caption-dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.tag_dropout < 1.0 or self.keep_tokens < 0:
            raise AdaptError(f"--tag-dropout must be in [0, 1) and --keep-tokens >= 0, got {self.tag_dropout} and {self.keep_tokens}")
        if self.lr <= 0:
            raise AdaptError(f"--lr must be > 0, got {self.lr}")
        if isinstance(self.validation_prompt, str):
            self.validation_prompt = [self.validation_prompt]
        self.validation_prompt = list(self.validation_prompt)
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise AdaptError(f"--snr-gamma must be > 0, got {self.snr_gamma}")
        if self.noise_offset < 0:
            raise AdaptError(f"--noise-offset must be >= 0, got {self.noise_offset}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise AdaptError(f"--ema-decay must be in [0, 1) (0 = off; 0.999 is usual), got {self.ema_decay}")
        check_choice("--save-ema value", self.save_ema, SAVE_EMA)
        if not self.ema_decay and (self.save_ema != "only" or self.ema_on_cpu):
            raise AdaptError(f"{'--ema-on-cpu' if self.ema_on_cpu else '--save-ema ' + self.save_ema} needs --ema-decay "
                             "(the moving average it is about)")
        if self.log_with not in (None, "tensorboard"):
            raise AdaptError(f"unknown tracker {self.log_with!r}; choose one of: tensorboard")
        if self.num_processes < 1 or self.validation_every < 0:
            raise AdaptError("--num-processes must be >= 1 and --validation-every >= 0")
        if self.fused_backward == "on":  # what conflicts already here fails now, before a model loads (optim decides the rest)
            choose_fused_backward(self, 0, self.num_processes)
        if not 0.0 <= self.validation_split < 1.0:
            raise AdaptError(f"--validation-split must be in [0, 1), got {self.validation_split}")
        if self.validation_split and self.validation_images:
            raise AdaptError("pass either --validation-split or --validation-images, not both")
        if self.keep_best and not (self.holds_out and self.checkpoint_every):
            raise AdaptError("--keep-best needs a validation set (--validation-split F or --validation-images DIR) "
                             "and --checkpoint-every N")

    @property
    def holds_out(self) -> bool:
        """Images are held out for a validation loss (--validation-split, --validation-images)."""
        return bool(self.validation_split or self.validation_images)

    def _check_group_lrs(self) -> None:
        for flag, value in (("--text-encoder-lr", self.text_encoder_lr), ("--embedding-lr", self.embedding_lr),
                            ("--loraplus-ratio", self.loraplus_ratio)):
            if value is not None and value <= 0:
                raise AdaptError(f"{flag} must be > 0, got {value}")
        if self.optimizer == "prodigy" and (self.text_encoder_lr, self.embedding_lr, self.loraplus_ratio) != (None, None, 1):
            raise AdaptError("--optimizer prodigy estimates one step size for all weights (prodigyopt refuses groups with "
                             "other learning rates); drop --text-encoder-lr, --embedding-lr and --loraplus-ratio")
        if self.optimizer == "schedule-free-adamw" and self.lr_scheduler not in ("constant", "constant_with_warmup"):
            raise AdaptError(f"--optimizer schedule-free-adamw replaces the LR schedule; use --lr-scheduler constant "
                             f"instead of {self.lr_scheduler} (--warmup-steps still warms it up)")

    def group_lr(self, group: str) -> float:
        """The learning rate of a method's parameter group (Method.parameter_groups): "unet", "text_encoder" or
        "embedding", times --loraplus-ratio for a ".lora_B" group (LoRA's B matrices)."""
        base, _, part = group.partition(".")
        lrs = {"unet": self.lr, "text_encoder": self.text_encoder_lr or self.lr, "embedding": self.embedding_lr or self.lr}
        if base not in lrs or part not in ("", "lora_B"):
            raise ValueError(f"unknown parameter group {group!r}")
        return lrs[base] * (self.loraplus_ratio if part == "lora_B" else 1.0)

    def check(self) -> None:
        """Before a run: the optimizer's optional package is installed (looked up, not imported); Prodigy's --lr
        is a multiplier of the step size it estimates, so an AdamW-sized --lr would all but stop it."""
        if self.optimizer in OPTIMIZER_PACKAGES:
            check_installed(OPTIMIZER_PACKAGES[self.optimizer], f"--optimizer {self.optimizer}", "adapt[optimizers]")
        if self.optimizer == "prodigy" and self.lr < 0.1:
            log.warning("--optimizer prodigy with --lr %g: Prodigy's step size is its own estimate times --lr, so this "
                        "makes its steps ~%dx smaller; --lr 1 (its default) is what it is made for", self.lr, round(1 / self.lr))

    @property
    def varies_tags(self) -> bool:
        """Captions change from step to step (--shuffle-tags, --tag-dropout)."""
        return self.shuffle_tags or self.tag_dropout > 0
