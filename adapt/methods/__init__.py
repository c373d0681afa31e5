"""Training methods: small strategies on the one loop in train.py.

A method has
    trainable_modules: names of the Components fields that hold trainable weights (accelerate wraps
                       these; the text encoder is cached and freed only when it is not listed),
    estimate_kind: what --dry-run's memory and time estimate models: "lora", "full" or "embedding",
    prepare(components): add adapters / new tokens before training (default: nothing),
    trainable_parameters(components) -> list of parameters the optimizer updates,
    parameter_groups(components) -> {group: parameters}: which learning rate each of them takes
                       ("unet", "text_encoder", "embedding", "<group>.lora_B"; TrainConfig.group_lr),
    group_steps() -> {group: steps}: groups that learn for fewer optimizer steps than the run (their
                       learning rate is 0 after them; default: none),
    after_step(components): runs after every optimizer step (default: nothing),
    prompt(text): the prompt as the tokenizer should see it (default: unchanged),
    tokenize(components, prompt): prompt -> input_ids (CLIP padding to 77 tokens),
    save(components, out_dir, recipe): write the artifact, carrying the recipe.
It builds itself from the run's configs (`from_configs`) and may check and complete them before a
run starts (`settle`, called before anything heavy loads).

METHODS names the methods the training commands run: each entry says where its class is (a
"module:Class" string, imported only when a run starts), the config sections it reads (its
command's options are generated from their fields, in this order) and its own [train] defaults.
This module and the method modules import nothing heavy at module level.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import AdaptError


@dataclass(frozen=True)
class MethodSpec:
    target: str                                  # "module:Class" of the Method
    sections: tuple[str, ...]                    # config sections it reads, in its command's option order
    train_defaults: Mapping[str, Any] = field(default_factory=dict)  # below adapt.json, recipe, flags
    model_section: str | None = None             # the model's adapt.json section it takes (None: the command's name)
    variant: tuple[str, str, "MethodSpec"] | None = None  # (section, switch, spec): run `spec` when the switch is on
    hidden: tuple[str, ...] = ()                 # "section.field" fields it reads but offers no option for
    help: Mapping[str, str] = field(default_factory=dict)  # "section.field" -> its option's help, where it differs
    description: str = ""                        # the command's --help text

    def resolve(self, configs: dict) -> "MethodSpec":
        """The spec that runs for these configs (DreamBooth with --lora runs the LoRA method)."""
        if self.variant is not None:
            section, switch, other = self.variant
            if getattr(configs[section], switch):
                return other.resolve(configs)
        return self

    def load(self) -> type:
        module, _, name = self.target.partition(":")
        return getattr(importlib.import_module(module), name)


DESCRIPTIONS = {  # each training command's --help text
    'lora': """Train a LoRA on the UNet's attention (Q,K by default) for a concept in a folder of images.

\b
Pivotal tuning (--pivotal --init-token WORD): the token is also a new word whose embedding learns
with the LoRA (--embedding-lr; --embedding-steps-fraction stops it early), saved beside the LoRA
file as learned_embeds.safetensors and inside the kohya file; `adapt generate --lora FILE` loads both.

\b
Example:
  adapt lora --images examples/cat --token "<sks>" --output outputs/cat-lora
  adapt generate "an emoji of <sks> cat face" --lora outputs/cat-lora/pytorch_lora_weights.safetensors
  adapt lora --images examples/cat --token "<sks>" --pivotal --init-token flat --output outputs/cat-pivotal
""",
    'dreambooth': """DreamBooth: fine-tune the whole UNet (optionally the text encoder) on a few images of one
subject bound to a rare token, with prior preservation on generated class images.

\b
Loss = mean(instance) + lambda * mean(class); every batch holds --batch-size instance images and
as many class images. Class images are generated once with the base model and cached under
outputs/class-images/. The result is a full diffusers pipeline folder (--lora: a LoRA file).
\b
Memory savers (see recipes/dreambooth-*gb.toml): --gradient-checkpointing (~20-30% slower),
--optimizer adamw8bit (optimizer state 4x smaller), --mixed-precision fp16|bf16 (frozen weights
in half precision, trainable fp32), cached latents and text embeddings (default on), --lora.
\b
Example:
  adapt dreambooth --images examples/cat --token sks --class-word "cat face" \\
      --class-prompt "an emoji of cat face" --output outputs/cat-db
""",
    'textual-inversion': """Textual inversion: learn a new word's embedding under a frozen model.

\b
The token (and token_1..token_{N-1} with --num-vectors N) is added to the tokenizer and starts from
--init-token's embedding; only those rows train, everything else stays bit-identical. Images
without a caption file are trained under prompt templates (--property object|style). Saved as
learned_embeds.safetensors ({token: [N, dim]}, diffusers' load_textual_inversion format);
--format a1111 also writes the A1111/ComfyUI file <token>.safetensors (the prompt word there).
\b
Example:
  adapt textual-inversion --images examples/cat --token "<cat-toy>" --init-token cat --output outputs/cat-ti
  adapt generate "an emoji of <cat-toy>" --embedding outputs/cat-ti/learned_embeds.safetensors
""",
}

_LORA = "adapt.methods.lora:LoraMethod"
_LORA_SECTIONS = ("data", "lora", "train")
_WITH_LORA = "{help} (with --lora)"
# DreamBooth trains no embedding: textual inversion's and pivotal tuning's options are not its own
_NO_EMBEDDING = ("train.embedding_lr", "lora.pivotal", "lora.init_token", "lora.num_vectors", "lora.embedding_steps_fraction")
METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(_LORA, _LORA_SECTIONS, variant=("lora", "pivotal", MethodSpec("adapt.methods.pivotal:PivotalMethod", _LORA_SECTIONS)),
                       help={"train.embedding_lr": "Learning rate of the new token's embedding vectors (with --pivotal). Default: --lr / 20."}, description=DESCRIPTIONS["lora"]),
    "dreambooth": MethodSpec(
        "adapt.methods.full:FullMethod", ("data", "dreambooth", "lora", "train"), {"lr": 5e-6},
        variant=("dreambooth", "lora", MethodSpec(_LORA, ("data", "dreambooth", "lora", "train"), model_section="dreambooth-lora")),
        hidden=_NO_EMBEDDING,
        help={"lora.rank": _WITH_LORA, "lora.alpha": _WITH_LORA, "lora.targets": _WITH_LORA, "train.loraplus_ratio": _WITH_LORA,
              "lora.adapter": _WITH_LORA, "lora.rank_stabilised": _WITH_LORA,
              "train.lr": "Peak learning rate. [default: 5e-06 (full UNet), 0.0001 with --lora]"},
        description=DESCRIPTIONS["dreambooth"]),
    "textual-inversion": MethodSpec(
        "adapt.methods.textual_inversion:TextualInversionMethod", ("textual_inversion", "data", "train"), {"lr": 5e-3},
        hidden=("data.class_word", "train.cache_text", "train.text_encoder_lr", "train.loraplus_ratio"),
        help={"data.prompt": "One prompt template instead of the --property templates; {token} is filled in.",
              "train.lr": "Peak learning rate. [default: 0.005]"},
        description=DESCRIPTIONS["textual-inversion"]),
}


def no_pivotal(configs: dict) -> None:
    """[lora] pivotal reaches a method that trains no embedding only from a DreamBooth recipe: an error, not ignored."""
    if getattr(configs.get("lora"), "pivotal", False):
        raise AdaptError("[lora] pivotal is for `adapt lora --pivotal`; DreamBooth trains no token embedding: "
                         "drop pivotal (and init_token, num_vectors, embedding_steps_fraction) from the recipe's [lora]")


class Method:
    trainable_modules: tuple[str, ...] = ("unet",)
    estimate_kind: str = "lora"  # what --dry-run's estimate models (estimate.ACT_BYTES): lora, full or embedding

    @classmethod
    def from_configs(cls, configs: dict) -> "Method":
        """The method for a run's configs ({section: config})."""
        raise NotImplementedError

    @classmethod
    def settle(cls, configs: dict, prompt_given: bool) -> str | list[str] | None:
        """Check and complete the configs before a run; returns the prompt template(s) to train under
        instead of [data] prompt, or None to keep it (`prompt_given`: by a flag or the recipe)."""
        return None

    def prepare(self, components) -> None:
        pass

    def trainable_parameters(self, components) -> list:
        raise NotImplementedError

    def parameter_groups(self, components) -> dict[str, list]:
        """The trainable parameters by learning-rate group, each in exactly one: by default the module's
        (`group_of`): "unet", or "text_encoder" for every text encoder (SDXL has two)."""
        trainable = {id(p) for p in self.trainable_parameters(components)}
        groups: dict[str, list] = {}
        for module in self.trainable_modules:
            for name, p in getattr(components, module).named_parameters():
                if id(p) in trainable:
                    groups.setdefault(self.group_of(module, name), []).append(p)
        return groups

    def group_of(self, module: str, name: str) -> str:
        """The group of the trainable parameter `name` of the Components field `module`."""
        return "unet" if module == "unet" else "text_encoder"

    def group_steps(self) -> dict[str, int]:
        """{group: optimizer steps}: parameter groups that learn for only that many steps of the run (pivotal
        tuning's embedding); after them their learning rate is 0 (optim.stop_groups). Default: none."""
        return {}

    def after_step(self, components) -> None:
        pass

    def prompt(self, text: str) -> str:
        """The prompt as the tokenizer should see it (textual inversion expands multi-vector tokens)."""
        return text

    def tokenize(self, components, prompt: str):
        """Prompt -> input_ids (CLIP padding to 77 tokens; one row per tokenizer for SDXL)."""
        from ..encode import tokenize  # here, not at the top: the CLI picks a method before torch loads

        return tokenize(components, self.prompt(prompt))

    def save(self, components, out_dir, recipe: dict) -> None:
        raise NotImplementedError
