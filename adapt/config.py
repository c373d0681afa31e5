"""Typed run configuration.

A run is described by one dataclass per section (`recipe.SECTIONS`): `DataConfig` [data], `LoraConfig`
[lora], `DreamBoothConfig` [dreambooth], `TextualInversionConfig` [textual_inversion] and
`TrainConfig` [train]. Each field is one recipe key and one flag: its default, help text and
command-line spelling are declared once, with `_f`, and the CLI generates its options from them.
Values come in layers, later ones winning (recipe.build): the field defaults, the method's own
defaults, the model's adapt.json, a recipe TOML file, then the flags. A value out of range is an
error when the dataclass is built.

This module imports nothing heavy: the CLI builds configs (and reports mistakes in them) before
torch is imported.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaptError
from .estimate import choose_fused_backward
from .logs import check_installed
from .schedulers import DEFAULT_SCHEDULER, check_scheduler


def _f(default, help: str, *, cli: Any = None, flags: str | None = None, recipe_only: bool = False):
    """A config field with its help text. The training commands' options are generated from these
    (adapt/cli.py): `cli` is the option's type where it is not the field's own (a folder is a Path,
    a list typed as one comma-separated string), `flags` its spelling where not --name / --name/--no-name,
    `recipe_only` keeps it off the command line."""
    meta = {"help": help, "cli": cli, "flags": flags, "recipe_only": recipe_only}
    return field(default=default, metadata=meta)


log = logging.getLogger("adapt")

DEFAULT_PROMPT = "a photo of {token}"  # with --class-word: "a photo of {token} {class_word}"


@dataclass
class DataConfig:
    images: str | None = _f(None, "Folder of training images; `name.txt` beside an image is its caption.", cli=Path)
    token: str | None = _f(None, "The rare word the concept is bound to, e.g. '<sks>'. Must not contain spaces.")
    prompt: str = _f(DEFAULT_PROMPT, "Prompt template for images without a caption file; {token} and {class_word} are filled in.")
    class_word: str | None = _f(None, "The concept's class, e.g. 'cat'; appended to the default prompt as 'a photo of {token} {class_word}'.")
    resolution: int | None = _f(None, "Training size in pixels (resize shorter side, center crop). Default: the model's native size.")
    random_flip: bool = _f(False, "Also train on horizontally flipped images (doubles the latent cache).")
    mask_from_alpha: bool = _f(False, "Masked loss: an image's alpha channel says where the loss counts (transparent = not learned). Without it, `name.mask.png` beside an image is its mask.")
    skip_bad_images: bool = _f(False, "Skip unreadable images with a warning instead of stopping.")
    buckets: bool = _f(False, "Aspect-ratio bucketing: train each image near its own shape (about resolution^2 pixels) instead of a center-cropped square.")
    bucket_step: int = _f(64, "Bucket sides are multiples of this many pixels; no image loses more than this per side.")
    dataset: str | None = _f(None, "A Hugging Face dataset instead of --images: an imagefolder with metadata.jsonl, a saved dataset, or a hub name in the local cache.")
    image_column: str = _f("image", "The --dataset column holding the images.")
    caption_column: str = _f("text", "The --dataset column holding the captions ({token} is filled in; other captions get ' {token}' only if --prompt says so).")

    def __post_init__(self):
        if self.token is not None:
            if not self.token.strip():
                raise AdaptError("the token is empty; pass a rare word such as --token '<sks>'")
            if any(c.isspace() for c in self.token):
                raise AdaptError(f"the token {self.token!r} contains whitespace; use one word such as '<sks>'")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise AdaptError(f"resolution {self.resolution} must be a positive multiple of 8, e.g. 512")
        if self.bucket_step < 8 or self.bucket_step % 8:
            raise AdaptError(f"--bucket-step {self.bucket_step} must be a positive multiple of 8, e.g. 64")
        if self.images and self.dataset:
            raise AdaptError("pass either --images DIR or --dataset NAME_OR_PATH, not both")


LORA_FORMATS = ("diffusers", "kohya")  # LoRA file layouts: diffusers/peft, kohya (ComfyUI, A1111)
# The layouts each adapter has (a run's "both" writes these): DoRA's and LoHa/LoKr's other layout would be misread.
ADAPTER_LAYOUTS = {"lora": ("diffusers", "kohya"), "dora": ("diffusers",), "loha": ("kohya",), "lokr": ("kohya",)}
_NO_LAYOUT = {
    "kohya": "a DoRA LoRA has no kohya file: A1111 and ComfyUI normalise a kohya dora_scale otherwise than peft's "
             "DoRA (per input column, or by the base weight's norm), so they would apply it wrongly; use the diffusers layout "
             "(diffusers' load_lora_weights and adapt generate read it)",
    "diffusers": "diffusers' load_lora_weights reads no LoHa or LoKr file for Stable Diffusion; use the kohya layout "
                 "(the LyCORIS file ComfyUI, A1111/Forge and adapt generate read)",
}
EMBEDDING_FORMATS = ("diffusers", "a1111")  # textual-inversion files: diffusers, A1111/ComfyUI
LORA_TARGET_ALIASES = {"q": "to_q", "k": "to_k", "v": "to_v", "out": "to_out.0"}


@dataclass
class LoraConfig:
    rank: int = _f(4, "LoRA rank r: the adapter's inner size. Higher learns more, file grows linearly.")
    alpha: float | None = _f(None, "LoRA alpha; the update is scaled by alpha/rank. Default: equal to the rank (scale 1).")
    targets: list[str] = _f(("q", "k"), "UNet attention projections to adapt: any of q,k,v,out (or module names like to_q).", cli=str)
    train_text_encoder: bool = _f(False, "Also put LoRA on the text encoder's q_proj/k_proj.")
    format: str = _f("both", "LoRA file(s): both, diffusers (pytorch_lora_weights.safetensors) or kohya (ComfyUI/A1111, <run folder>.safetensors). DoRA has only the diffusers file, LoHa/LoKr only the kohya (LyCORIS) one.")
    adapter: str = _f("lora", "Adapter: lora, dora (LoRA plus a learned magnitude per output row, peft's use_dora), loha (LyCORIS Hadamard product) or lokr (LyCORIS Kronecker product).")
    rank_stabilised: bool = _f(False, "rsLoRA: scale the update by alpha/sqrt(rank) instead of alpha/rank (lora and dora).")
    pivotal: bool = _f(False, "Pivotal tuning: also learn the token as a new word (its embedding, as textual inversion does) together "
                       "with the LoRA; the embedding is saved beside the LoRA file and inside the kohya one. Needs --init-token.")
    init_token: str | None = _f(None, "With --pivotal: an existing single-token word the new embedding starts from, e.g. 'cat' "
                                   "(or a phrase of exactly --num-vectors tokens: one vector from each).")
    num_vectors: int = _f(1, "With --pivotal: embedding vectors for the token (more = more capacity; token, token_1, ...).")
    embedding_steps_fraction: float = _f(1.0, "With --pivotal: the embedding learns during this fraction of the steps, then "
                                         "stays as it is (learning rate 0) while the LoRA goes on; 1 = the whole run.")

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        self.targets = list(self.targets)
        if not self.targets:
            raise AdaptError("--targets is empty; choose from q,k,v,out")
        if self.rank < 1:
            raise AdaptError(f"--rank must be >= 1, got {self.rank}")
        check_lora_format(self.format, "both")
        _choice("adapter", self.adapter, tuple(ADAPTER_LAYOUTS))
        if self.rank_stabilised and self.adapter not in ("lora", "dora"):
            raise AdaptError(f"--rank-stabilised is for --adapter lora or dora (peft's use_rslora); {self.adapter} "
                             "has no rank-stabilised scale")
        for layout in self.layouts:
            check_adapter_layout(self.adapter, layout)
        if self.num_vectors < 1 or not 0.0 < self.embedding_steps_fraction <= 1.0:
            raise AdaptError(f"--num-vectors must be >= 1 and --embedding-steps-fraction in (0, 1], got {self.num_vectors} "
                             f"and {self.embedding_steps_fraction}")
        if not self.pivotal and (self.init_token, self.num_vectors, self.embedding_steps_fraction) != (None, 1, 1.0):
            raise AdaptError("--init-token, --num-vectors and --embedding-steps-fraction are for pivotal tuning; add --pivotal "
                             "(a LoRA that learns the token's embedding too) or drop them")
        if self.alpha is None:
            self.alpha = float(self.rank)

    @property
    def layouts(self) -> tuple[str, ...]:
        """The LoRA file layouts the run writes: --format, where "both" means every layout the adapter has."""
        return ADAPTER_LAYOUTS[self.adapter] if self.format == "both" else (self.format,)

    @property
    def target_modules(self) -> list[str]:
        """Short names mapped to diffusers' attention module names (q -> to_q, out -> to_out.0)."""
        return [LORA_TARGET_ALIASES.get(t, t) for t in self.targets]


@dataclass
class DreamBoothConfig:
    prior_preservation: bool = _f(True, "Train on generated class images too, so the model keeps its idea of the class.")
    class_prompt: str | None = _f(None, "Prompt for class images. Default: 'a photo of {class_word}'.")
    num_class_images: int = _f(100, "How many class images to use (generated with the base model when missing).")
    prior_loss_weight: float = _f(1.0, "lambda in loss = mean(instance) + lambda * mean(class).")
    class_images: str | None = _f(None, "Folder of your own class images (topped up by generation when too few).", cli=Path)
    class_scheduler: str = _f(DEFAULT_SCHEDULER, "Scheduler for generating class images.")
    class_steps: int = _f(25, "Denoising steps for generating class images.")
    train_text_encoder: bool = _f(False, "Also fine-tune the text encoder (saved in the pipeline folder); more memory.")
    lora: bool = _f(False, "DreamBooth-LoRA: train LoRA adapters (the [lora] settings) instead of the full UNet.", flags="--lora/--full")

    def __post_init__(self):
        if self.num_class_images < 1:
            raise AdaptError(f"--num-class-images must be >= 1, got {self.num_class_images}")
        if self.prior_loss_weight < 0:
            raise AdaptError(f"--prior-loss-weight must be >= 0, got {self.prior_loss_weight}")
        if self.class_steps < 1:
            raise AdaptError(f"--class-steps must be >= 1, got {self.class_steps}")

    def check(self) -> None:
        """Before a run: the class-image scheduler is one `adapt schedulers` lists."""
        check_scheduler(self.class_scheduler)


@dataclass
class TextualInversionConfig:
    init_token: str | None = _f(None, "An existing single-token word the new embedding starts from, e.g. 'cat' (or a phrase of "
                                   "exactly --num-vectors tokens: one vector from each).")
    num_vectors: int = _f(1, "Embedding vectors for the token (more = more capacity; token, token_1, ...).")
    property: str = _f("object", "Prompt templates around the token: object or style (caption files override).")
    format: str = _f("diffusers", "Embedding file format(s): diffusers, or a1111 to also write the A1111/ComfyUI file.")
    scale_lr: bool = _f(False, "Multiply --lr by batch size x gradient accumulation.")

    def __post_init__(self):
        _choice("property", self.property, ("object", "style"))
        _choice("format", self.format, EMBEDDING_FORMATS)
        if self.num_vectors < 1:
            raise AdaptError(f"--num-vectors must be >= 1, got {self.num_vectors}")


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
    steps: int = _f(500, "Optimizer steps (each is batch_size x grad_accum images).")
    batch_size: int = _f(1, "Images per forward pass (with prior preservation, as many class images again).")
    grad_accum: int = _f(1, "Gradient accumulation: micro-batches per optimizer step.")
    lr: float = _f(1e-4, "Learning rate.")
    lr_scheduler: str = _f("constant", "Learning-rate schedule: " + ", ".join(LR_SCHEDULERS) + ".")
    warmup_steps: int = _f(0, "Linear warm-up steps of the learning-rate schedule.")
    optimizer: str = _f("adamw", "adamw (torch); adamw8bit (bitsandbytes: ~75% less optimizer memory, needs a GPU build); "
                        "prodigy (prodigyopt: estimates its own step size, --lr multiplies it and defaults to 1); "
                        "schedule-free-adamw (schedulefree: no LR schedule, --warmup-steps is its own warm-up; "
                        "validates and saves its averaged weights).")
    text_encoder_lr: float | None = _f(None, "Learning rate of the text encoder's trainable weights (--train-text-encoder). Default: --lr.")
    embedding_lr: float | None = _f(None, "Learning rate of the new token's embedding vectors. Default: --lr.")
    loraplus_ratio: float = _f(1.0, "LoRA+: LoRA's B matrices learn at this many times the learning rate of the A matrices "
                               "(16 is the LoRA+ paper's choice; 1 = plain LoRA).")
    weight_decay: float = _f(1e-2, "Weight decay (decoupled, as AdamW's, with every --optimizer).", recipe_only=True)
    max_grad_norm: float = _f(1.0, "Clip the gradient norm to this value (0 disables).")
    mixed_precision: str = _f("auto", "auto | no | fp16 | bf16. Frozen weights and activations in this dtype; trainable weights "
                              "stay fp32. auto: bf16 on GPUs of compute capability >= 8 and on CPUs with AMX/AVX512-BF16 "
                              "for SD-sized UNets, fp16 on older GPUs, else no (fp32); the run's first lines say which and why.")
    compile: bool = _f(False, "torch.compile the UNet (inductor): the first steps are slow while it compiles.")
    channels_last: bool = _f(False, "Keep the UNet's weights and activations in channels-last memory layout.")
    adamw_kernel: str = _f("auto", "torch AdamW's implementation: for, foreach or fused; auto: fused where torch has it for "
                           "the device (CPU, CUDA) unless fp16, else torch's default.", recipe_only=True)
    fused_backward: str = _f("auto", "Step each weight inside backward as soon as its gradient is complete, then free the gradient: a full "
                             "fine-tune never holds all gradients (SD 1.5: 3.2 GiB less); clipping is then per weight tensor. "
                             "auto: on for 100M+ trainable parameters with adamw/adamw8bit, one process, no --grad-accum, not fp16.")
    recast_weights: bool = _f(True, "Under mixed precision, cast each trainable weight again in backward instead of keeping "
                              "autocast's low-precision copy from forward (same gradients; a full SD 1.5 fine-tune holds ~1.1 GiB "
                              "less). Off with --compile.", recipe_only=True)
    gradient_checkpointing: bool = _f(False, "Recompute activations in backward: much less memory, ~20-30% slower.")
    cache_latents: bool = _f(True, "Encode each image (and its flip) with the VAE once, then free the VAE.")
    cache_text: bool = _f(True, "Encode each distinct prompt once when the text encoder is frozen, then free it.")
    disk_cache: bool = _f(True, "Keep cached latents and text embeddings on disk, keyed by a hash of everything they depend on, so a later run on the same data skips encoding.")
    cache_dir: str | None = _f(None, "Folder of the disk cache. Default: $ADAPT_CACHE_DIR, else $XDG_CACHE_HOME/adapt, else ~/.cache/adapt.", cli=Path)
    caption_dropout: float = _f(0.0, "Probability of training a sample with an empty prompt (enables classifier-free guidance).")
    shuffle_tags: bool = _f(False, "Shuffle each caption's comma-separated tags every step (the text cache is then off).")
    keep_tokens: int = _f(0, "With --shuffle-tags / --tag-dropout: the first N tags of a caption stay in place and are never dropped.")
    tag_dropout: float = _f(0.0, "Drop each tag of a caption (except the kept ones) with this probability every step (the text cache is then off).")
    seed: int = _f(0, "Seed for noise, timesteps, data order and new weights.")
    checkpoint_every: int = _f(0, "Save the full training state every N steps under OUTPUT/checkpoints (0 = never).")
    keep_checkpoints: int = _f(2, "How many of the newest checkpoints to keep.")
    resume: str | None = _f(None, "Continue a run: 'latest' (newest checkpoint in --output) or a checkpoint folder.")
    skip_nonfinite: bool = _f(False, "Skip a batch whose loss is NaN/inf (logged) instead of stopping the run.")
    snr_gamma: float | None = _f(None, "Min-SNR loss weighting with this gamma (5 is usual): faster, steadier convergence.")
    loss: str = _f("mse", "Per-element loss: mse, huber (pseudo-Huber: quadratic below --huber-delta, linear above) or smooth-l1.")
    huber_delta: float = _f(0.1, "huber / smooth-l1: the delta c where the loss turns from quadratic to linear (kohya's huber_c).")
    huber_schedule: str = _f("constant", "huber / smooth-l1: delta over timesteps: constant, snr or exponential (kohya's huber_schedule).")
    noise_offset: float = _f(0.0, "Add this much per-channel offset noise (0.05-0.1) so the model learns very dark/bright images.")
    ema_decay: float = _f(0.0, "Keep an exponential moving average of the trained weights with this decay (e.g. 0.999; 0 = off) and save it as the artifact.")
    ema_on_cpu: bool = _f(False, "Keep the moving average in CPU memory (no extra GPU memory for a full fine-tune; slower steps).")
    save_ema: str = _f("only", "With --ema-decay: only (the artifact holds the averaged weights) or both (also the trained weights, in OUTPUT/raw).")
    log_with: str | None = _f(None, "Also log to a tracker: tensorboard (logs under OUTPUT/logs).")
    validation_prompt: list[str] = _f((), "Prompt rendered during training with a fixed seed (repeatable).")
    validation_every: int = _f(0, "Every N steps: render the validation prompts, compute the validation loss (0 = only at the end).")
    validation_steps: int = _f(25, "Denoising steps (dpm++2m-karras) for validation images.")
    validation_split: float = _f(0.0, "Hold out this fraction of the instance images (at least one, chosen by --seed; never trained on) for a validation loss at fixed noise and timesteps: instance images only, no class images or prior term.")
    validation_images: str | None = _f(None, "Folder of held-out images for the validation loss, instead of --validation-split (captions as for --images).", cli=Path)
    keep_best: bool = _f(False, "With a validation set and --checkpoint-every: also keep the checkpoint with the lowest validation loss (measured at every checkpoint too).")
    num_processes: int = _f(1, "Data-parallel processes (relaunches itself with `accelerate launch`).")

    def __post_init__(self):
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("mixed precision", self.mixed_precision, PRECISIONS)
        _choice("AdamW kernel", self.adamw_kernel, ADAMW_KERNELS)
        _choice("--fused-backward value", self.fused_backward, FUSED_BACKWARD)
        _choice("lr scheduler", self.lr_scheduler, LR_SCHEDULERS)
        _choice("loss", self.loss, LOSSES)
        _choice("huber schedule", self.huber_schedule, HUBER_SCHEDULES)
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
        _choice("--save-ema value", self.save_ema, SAVE_EMA)
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


def _choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise AdaptError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")


def check_lora_format(fmt: str, *extra: str) -> None:
    """The one check of a LoRA layout name (`extra`: more accepted names, e.g. "both" for a run)."""
    _choice("LoRA format", fmt, (*extra, *LORA_FORMATS))


def check_adapter_layout(adapter: str, layout: str) -> None:
    """The one check that a LoRA variant (lora, dora, loha, lokr) has a file in `layout`."""
    if layout not in ADAPTER_LAYOUTS[adapter]:
        raise AdaptError(_NO_LAYOUT[layout])
