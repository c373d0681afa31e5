"""Full fine-tuning of the UNet (and optionally the text encoder); saves a whole pipeline folder.

This is what DreamBooth trains, and what builds the bundled base model from scratch.
"""

from __future__ import annotations

from . import Method, no_pivotal


class FullMethod(Method):
    estimate_kind = "full"

    def __init__(self, train_text_encoder: bool = False):
        self.train_text_encoder = train_text_encoder
        self.trainable_modules = ("unet", "text_encoder") if train_text_encoder else ("unet",)

    @classmethod
    def from_configs(cls, configs: dict) -> "FullMethod":
        return cls(train_text_encoder=configs["dreambooth"].train_text_encoder)

    @classmethod
    def settle(cls, configs: dict, prompt_given: bool) -> None:
        no_pivotal(configs)

    def prepare(self, components) -> None:
        if self.train_text_encoder:  # every text encoder (SDXL has two)
            self.trainable_modules = ("unet", *components.text_encoder_names)
        for n in self.trainable_modules:
            getattr(components, n).requires_grad_(True)

    def trainable_parameters(self, components) -> list:
        return [p for n in self.trainable_modules for p in getattr(components, n).parameters()]

    def save(self, components, out_dir, recipe: dict) -> None:
        # lazy: LIGHT module (plan loads the method class to settle its configs)
        from ..formats import save_pipeline

        save_pipeline(components, out_dir, recipe)
