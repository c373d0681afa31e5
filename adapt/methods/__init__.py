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
"""

from __future__ import annotations


class Method:
    trainable_modules: tuple[str, ...] = ("unet",)

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
        from ..encode import tokenize  # here, not at the top: the CLI picks a method before torch loads

        return tokenize(components, self.prompt(prompt))

    def save(self, components, out_dir, recipe: dict) -> None:
        raise NotImplementedError
