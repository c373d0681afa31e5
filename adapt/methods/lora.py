"""LoRA: low-rank adapters (peft) on the UNet's attention projections, optionally the text encoder's.

`--adapter` picks peft's adapter: lora, dora (LoraConfig use_dora), loha (LoHaConfig) or lokr
(LoKrConfig); `--rank-stabilised` is LoraConfig's use_rslora. Only the adapter weights train; the
base weights are never modified, and the loop is the same for all. Saved (formats.save_lora) as
`pytorch_lora_weights.safetensors` in the diffusers/peft key format that
`StableDiffusionPipeline.load_lora_weights` reads, with peft's adapter config (so alpha != rank
loads right), and as `<run folder>.safetensors` in the kohya layout ComfyUI and A1111 read (DoRA:
the diffusers file only; LoHa/LoKr: the kohya/LyCORIS file only); the run's recipe is in the
files' metadata.
"""

from __future__ import annotations

from ..config import LoraConfig
from ..errors import AdaptError
from . import Method, no_pivotal

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj"]


class LoraMethod(Method):
    def __init__(self, cfg: LoraConfig):
        self.cfg = cfg
        self.trainable_modules = ("unet", "text_encoder") if cfg.train_text_encoder else ("unet",)

    @classmethod
    def from_configs(cls, configs: dict) -> "LoraMethod":
        return cls(configs["lora"])

    @classmethod
    def settle(cls, configs: dict, prompt_given: bool) -> None:
        no_pivotal(configs)

    def _config(self, targets):
        """peft's config of the adapter; each starts as an exact no-op (LoRA/DoRA: zero B, and DoRA's
        magnitude the weight's own norm; LoHa: zero w2_b; LoKr: zero W1)."""
        # lazy: LIGHT module (plan loads the method class to settle its configs)
        from peft import LoHaConfig, LoKrConfig
        from peft import LoraConfig as PeftLoraConfig

        cfg = self.cfg
        if cfg.adapter in ("loha", "lokr"):
            return (LoHaConfig if cfg.adapter == "loha" else LoKrConfig)(r=cfg.rank, alpha=cfg.alpha, target_modules=targets)
        # gaussian A, zero B (as diffusers' LoRA examples)
        return PeftLoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets,
                              use_dora=cfg.adapter == "dora", use_rslora=cfg.rank_stabilised)

    def prepare(self, components) -> None:
        names = {n.rsplit(".", 1)[-1] for n, _ in components.unet.named_modules()}
        dotted = {n for n, _ in components.unet.named_modules()}
        for t in self.cfg.target_modules:
            if t not in names and not any(n.endswith("." + t) for n in dotted):
                raise AdaptError(f"LoRA target '{t}' is not a module of this UNet; choose from q,k,v,out")
        components.unet.add_adapter(self._config(self.cfg.target_modules))
        if self.cfg.train_text_encoder:  # every text encoder (SDXL has two)
            self.trainable_modules = ("unet", *components.text_encoder_names)
            for name in components.text_encoder_names:
                getattr(components, name).add_adapter(self._config(TEXT_ENCODER_TARGETS))

    def trainable_parameters(self, components) -> list:
        return [p for n in self.trainable_modules for p in getattr(components, n).parameters() if p.requires_grad]

    def group_of(self, module: str, name: str) -> str:
        """LoRA+: the B matrices are a group of their own (they take --loraplus-ratio times the lr)."""
        return super().group_of(module, name) + (".lora_B" if ".lora_B." in name else "")

    def save(self, components, out_dir, recipe: dict) -> None:
        # lazy: LIGHT module (plan loads the method class to settle its configs)
        from ..formats import save_lora

        save_lora(components, out_dir, recipe, self.cfg.layouts)
