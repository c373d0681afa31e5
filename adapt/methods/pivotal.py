"""Pivotal tuning: a LoRA and its token's embedding learnt together in one run (`adapt lora --pivotal`).

The method is the LoRA method and the textual-inversion method side by side, not a copy of either:
LoraMethod puts the adapters on the UNet (and with --train-text-encoder on the text encoders),
TextualInversionMethod adds the token as a new word whose rows start from --init-token's; after
every step the other rows are put back, so they and every base weight stay bit-identical. Each part
takes its own learning rate (--lr, --text-encoder-lr, --loraplus-ratio for the LoRA; --embedding-lr
for the embedding). With --embedding-steps-fraction F the embedding learns during the first
round(F x steps) steps only, then keeps its value while the LoRA goes on: its learning rate is 0 from
then on (`group_steps`, applied by optim.stop_groups), the pivot of diffusers' advanced DreamBooth
script (--train_text_encoder_ti_frac). The text encoder runs every step, so its outputs are never
cached. Saved by formats.save_lora: the LoRA file(s), learned_embeds.safetensors beside them (named
in the diffusers file's metadata), and the embedding bundled inside the kohya file as A1111 reads it.
"""

from __future__ import annotations

from ..config import LoraConfig, TextualInversionConfig
from ..errors import AdaptError
from . import Method
from .lora import LoraMethod
from .textual_inversion import TextualInversionMethod


# --embedding-lr's default with --pivotal: a twentieth of --lr. Measured on the 4,800-step bundled base (README "Pivotal
# tuning", benchmarks/pivotal_sweep.py, 150 steps, training seeds 0-3): --init-token cat at lr / 20 ended at
# 6.68 on average against 7.55 at --lr's own 4e-3 (seed 0) and textual inversion's 7.53.
# On the shipped base, from --init-token flat (seeds 0-3): 6.28 at lr / 20, 6.22 at 1e-5; LoRA alone 6.98.
EMBEDDING_LR_FRACTION = 1 / 20


class PivotalMethod(Method):
    estimate_kind = "pivotal"

    def __init__(self, cfg: LoraConfig, token: str, steps: int):
        """`cfg`: the [lora] section (pivotal, init_token, num_vectors, embedding_steps_fraction among its
        fields); `token`: the new word ([data] token); `steps`: the run's optimizer steps."""
        self.lora = LoraMethod(cfg)
        self.ti = TextualInversionMethod(TextualInversionConfig(init_token=cfg.init_token, num_vectors=cfg.num_vectors), token)
        self.trainable_modules = ("unet", "text_encoder")
        fraction = cfg.embedding_steps_fraction
        self.embedding_steps = None if fraction >= 1.0 else max(1, round(fraction * steps))

    @classmethod
    def from_configs(cls, configs: dict) -> "PivotalMethod":
        return cls(configs["lora"], configs["data"].token, configs["train"].steps)

    @classmethod
    def settle(cls, configs: dict, prompt_given: bool) -> None:
        """--init-token is required; a token A1111 cannot read from the kohya file, and a stop that a
        schedule-free optimizer would not keep (its average moves on at learning rate 0), are errors;
        --embedding-lr defaults to --lr x EMBEDDING_LR_FRACTION (not with prodigy, whose --lr is a multiplier)."""
        lora, train, token = configs["lora"], configs["train"], configs["data"].token
        if train.embedding_lr is None and train.optimizer != "prodigy":
            train.embedding_lr = train.lr * EMBEDDING_LR_FRACTION
        if not lora.init_token:
            raise AdaptError("pivotal tuning needs --init-token WORD: an existing word the token's new embedding starts "
                             "from, e.g. --init-token flat for examples/cat's flat-style cats (README, Pivotal tuning)")
        if token and "." in token and "kohya" in lora.layouts:
            raise AdaptError(f"the token {token!r} has a '.', which A1111 cannot read from a LoRA file's bundled embedding "
                             "(bundle_emb.<token>.*); pick a token without one, e.g. '<sks>'")
        if lora.embedding_steps_fraction < 1.0 and train.optimizer == "schedule-free-adamw":
            raise AdaptError("--embedding-steps-fraction below 1 stops the embedding with learning rate 0, which "
                             "schedule-free-adamw's averaged weights do not keep still; use another --optimizer or fraction 1")
        return None

    def prepare(self, components) -> None:
        # The token first: peft's add_adapter marks all but its adapters frozen, so the embedding is enabled after it.
        self.ti.prepare(components)
        self.lora.prepare(components)
        for weight in self.ti.trainable_parameters(components):
            weight.requires_grad_(True)
        self.trainable_modules = ("unet", *components.text_encoder_names)

    def _embedding(self, components) -> tuple[list, set[int]]:
        weights = self.ti.trainable_parameters(components)
        return weights, {id(w) for w in weights}

    def trainable_parameters(self, components) -> list:
        """The LoRA's parameters, then the embedding matrices (--train-text-encoder's LoRA lists them too: once here)."""
        weights, ids = self._embedding(components)
        return [p for p in self.lora.trainable_parameters(components) if id(p) not in ids] + weights

    def parameter_groups(self, components) -> dict[str, list]:
        """The LoRA's groups ("unet", "text_encoder", their ".lora_B" with LoRA+) and "embedding"."""
        weights, ids = self._embedding(components)
        groups = {name: [p for p in ps if id(p) not in ids] for name, ps in self.lora.parameter_groups(components).items()}
        return {**{name: ps for name, ps in groups.items() if ps}, "embedding": weights}

    def group_steps(self) -> dict[str, int]:
        return {} if self.embedding_steps is None else {"embedding": self.embedding_steps}

    def after_step(self, components) -> None:
        self.ti.after_step(components)  # the rows of the old words back to the base's

    def prompt(self, text: str) -> str:
        return self.ti.prompt(text)

    def save(self, components, out_dir, recipe: dict) -> None:
        # lazy: LIGHT module (plan loads the method class to settle its configs)
        from ..formats import save_lora

        save_lora(components, out_dir, recipe, self.lora.cfg.layouts, embedding=(self.ti.token, self.ti.learned(components)))
