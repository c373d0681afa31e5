"""Training methods: small strategies on the one loop in train.py.

A method has
    trainable_modules: names of the Components fields that hold trainable weights (accelerate wraps
                       these; the text encoder is cached and freed only when it is not listed),
    prepare(components): add adapters / new tokens before training (default: nothing),
    trainable_parameters(components) -> list of parameters the optimizer updates,
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


@dataclass(frozen=True)
class MethodSpec:
    target: str                                  # "module:Class" of the Method
    sections: tuple[str, ...]                    # config sections it reads, in its command's option order
    train_defaults: Mapping[str, Any] = field(default_factory=dict)  # below adapt.json, recipe, flags
    model_defaults: bool = True                  # the model's adapt.json suggestions for the command apply
    variant: tuple[str, str, "MethodSpec"] | None = None  # (section, switch, spec): run `spec` when the switch is on
    hidden: tuple[str, ...] = ()                 # "section.field" fields it reads but offers no option for
    help: Mapping[str, str] = field(default_factory=dict)  # "section.field" -> its option's help, where it differs

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


_LORA = "adapt.methods.lora:LoraMethod"
_WITH_LORA = "{help} (with --lora)"
METHODS: dict[str, MethodSpec] = {
    "lora": MethodSpec(_LORA, ("data", "lora", "train")),
    "dreambooth": MethodSpec(
        "adapt.methods.full:FullMethod", ("data", "dreambooth", "lora", "train"), {"lr": 5e-6},
        variant=("dreambooth", "lora", MethodSpec(_LORA, ("data", "dreambooth", "lora", "train"), model_defaults=False)),
        help={"lora.rank": _WITH_LORA, "lora.alpha": _WITH_LORA, "lora.targets": _WITH_LORA,
              "train.lr": "Peak learning rate. [default: 5e-06 (full UNet), 0.0001 with --lora]"}),
    "textual-inversion": MethodSpec(
        "adapt.methods.textual_inversion:TextualInversionMethod", ("textual_inversion", "data", "train"), {"lr": 5e-3},
        hidden=("data.class_word", "train.cache_text"),
        help={"data.prompt": "One prompt template instead of the --property templates; {token} is filled in.",
              "train.lr": "Peak learning rate. [default: 0.005]"}),
}


class Method:
    trainable_modules: tuple[str, ...] = ("unet",)

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

    def after_step(self, components) -> None:
        pass

    def prompt(self, text: str) -> str:
        """The prompt as the tokenizer should see it (textual inversion expands multi-vector tokens)."""
        return text

    def tokenize(self, components, prompt: str):
        """Prompt -> input_ids (CLIP padding to 77 tokens; one row per tokenizer for SDXL)."""
        from ..models import tokenize_prompt

        return tokenize_prompt(components, self.prompt(prompt))

    def save(self, components, out_dir, recipe: dict) -> None:
        raise NotImplementedError
