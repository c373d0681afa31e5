"""Typed run configuration.

A run is described by one dataclass per section (`recipe.SECTIONS`): `DataConfig` [data], `LoraConfig`
[lora], `DreamBoothConfig` [dreambooth], `TextualInversionConfig` [textual_inversion] and
`TrainConfig` [train] (train_config.py). Each field is one recipe key and one flag: its default, help text
and command-line spelling are declared once, with `option`, and the CLI generates its options from them.
Values come in layers, later ones winning (recipe.build): the field defaults, the method's own
defaults, the model's adapt.json, a recipe TOML file, then the flags. A value out of range is an
error when the dataclass is built.

This module imports nothing heavy: the CLI builds configs (and reports mistakes in them) before
torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import AdaptError
from .schedulers import DEFAULT_SCHEDULER, check_scheduler


def option(default, help: str, *, cli: Any = None, flags: str | None = None, recipe_only: bool = False):
    """A config field with its help text. The training commands' options are generated from these
    (adapt/cli.py): `cli` is the option's type where it is not the field's own (a folder is a Path,
    a list typed as one comma-separated string), `flags` its spelling where not --name / --name/--no-name,
    `recipe_only` keeps it off the command line."""
    meta = {"help": help, "cli": cli, "flags": flags, "recipe_only": recipe_only}
    return field(default=default, metadata=meta)


DEFAULT_PROMPT = "a photo of {token}"  # with --class-word: "a photo of {token} {class_word}"


@dataclass
class DataConfig:
    images: str | None = option(None, "Folder of training images; `name.txt` beside an image is its caption.", cli=Path)
    token: str | None = option(None, "The rare word the concept is bound to, e.g. '<sks>'. Must not contain spaces.")
    prompt: str = option(DEFAULT_PROMPT, "Prompt template for images without a caption file; {token} and {class_word} are filled in.")
    class_word: str | None = option(None, "The concept's class, e.g. 'cat'; appended to the default prompt as 'a photo of {token} {class_word}'.")
    resolution: int | None = option(None, "Training size in pixels (resize shorter side, center crop). Default: the model's native size.")
    random_flip: bool = option(False, "Also train on horizontally flipped images (doubles the latent cache).")
    mask_from_alpha: bool = option(False, "Masked loss: an image's alpha channel says where the loss counts (transparent = not learned). Without it, `name.mask.png` beside an image is its mask.")
    skip_bad_images: bool = option(False, "Skip unreadable images with a warning instead of stopping.")
    buckets: bool = option(False, "Aspect-ratio bucketing: train each image near its own shape (about resolution^2 pixels) instead of a center-cropped square.")
    bucket_step: int = option(64, "Bucket sides are multiples of this many pixels; no image loses more than this per side.")
    dataset: str | None = option(None, "A Hugging Face dataset instead of --images: an imagefolder with metadata.jsonl, a saved dataset, or a hub name in the local cache.")
    image_column: str = option("image", "The --dataset column holding the images.")
    caption_column: str = option("text", "The --dataset column holding the captions ({token} is filled in; other captions get ' {token}' only if --prompt says so).")

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
    rank: int = option(4, "LoRA rank r: the adapter's inner size. Higher learns more, file grows linearly.")
    alpha: float | None = option(None, "LoRA alpha; the update is scaled by alpha/rank. Default: equal to the rank (scale 1).")
    targets: list[str] = option(("q", "k"), "UNet attention projections to adapt: any of q,k,v,out (or module names like to_q).", cli=str)
    train_text_encoder: bool = option(False, "Also put LoRA on the text encoder's q_proj/k_proj.")
    format: str = option("both", "LoRA file(s): both, diffusers (pytorch_lora_weights.safetensors) or kohya (ComfyUI/A1111, <run folder>.safetensors). DoRA has only the diffusers file, LoHa/LoKr only the kohya (LyCORIS) one.")
    adapter: str = option("lora", "Adapter: lora, dora (LoRA plus a learned magnitude per output row, peft's use_dora), loha (LyCORIS Hadamard product) or lokr (LyCORIS Kronecker product).")
    rank_stabilised: bool = option(False, "rsLoRA: scale the update by alpha/sqrt(rank) instead of alpha/rank (lora and dora).")
    pivotal: bool = option(False, "Pivotal tuning: also learn the token as a new word (its embedding, as textual inversion does) together "
                       "with the LoRA; the embedding is saved beside the LoRA file and inside the kohya one. Needs --init-token.")
    init_token: str | None = option(None, "With --pivotal: an existing single-token word the new embedding starts from, e.g. "
                                   "'flat' for examples/cat (README, Pivotal tuning: which word); or a phrase of exactly "
                                   "--num-vectors tokens, one vector from each.")
    num_vectors: int = option(1, "With --pivotal: embedding vectors for the token (more = more capacity; token, token_1, ...).")
    embedding_steps_fraction: float = option(1.0, "With --pivotal: the embedding learns during this fraction of the steps, then "
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
        check_choice("adapter", self.adapter, tuple(ADAPTER_LAYOUTS))
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
    prior_preservation: bool = option(True, "Train on generated class images too, so the model keeps its idea of the class.")
    class_prompt: str | None = option(None, "Prompt for class images. Default: 'a photo of {class_word}'.")
    num_class_images: int = option(100, "How many class images to use (generated with the base model when missing).")
    prior_loss_weight: float = option(1.0, "lambda in loss = mean(instance) + lambda * mean(class).")
    class_images: str | None = option(None, "Folder of your own class images (topped up by generation when too few).", cli=Path)
    class_scheduler: str = option(DEFAULT_SCHEDULER, "Scheduler for generating class images.")
    class_steps: int = option(25, "Denoising steps for generating class images.")
    train_text_encoder: bool = option(False, "Also fine-tune the text encoder (saved in the pipeline folder); more memory.")
    lora: bool = option(False, "DreamBooth-LoRA: train LoRA adapters (the [lora] settings) instead of the full UNet.", flags="--lora/--full")

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
    init_token: str | None = option(None, "An existing single-token word the new embedding starts from, e.g. 'cat' (or a phrase of "
                                   "exactly --num-vectors tokens: one vector from each).")
    num_vectors: int = option(1, "Embedding vectors for the token (more = more capacity; token, token_1, ...).")
    property: str = option("object", "Prompt templates around the token: object or style (caption files override).")
    format: str = option("diffusers", "Embedding file format(s): diffusers, or a1111 to also write the A1111/ComfyUI file.")
    scale_lr: bool = option(False, "Multiply --lr by batch size x gradient accumulation.")

    def __post_init__(self):
        check_choice("property", self.property, ("object", "style"))
        check_choice("format", self.format, EMBEDDING_FORMATS)
        if self.num_vectors < 1:
            raise AdaptError(f"--num-vectors must be >= 1, got {self.num_vectors}")


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise AdaptError(f"unknown {what} {value!r}; choose one of: {', '.join(valid)}")


def check_lora_format(fmt: str, *extra: str) -> None:
    """The one check of a LoRA layout name (`extra`: more accepted names, e.g. "both" for a run)."""
    check_choice("LoRA format", fmt, (*extra, *LORA_FORMATS))


def check_adapter_layout(adapter: str, layout: str) -> None:
    """The one check that a LoRA variant (lora, dora, loha, lokr) has a file in `layout`."""
    if layout not in ADAPTER_LAYOUTS[adapter]:
        raise AdaptError(_NO_LAYOUT[layout])
