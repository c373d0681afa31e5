"""Textual inversion: a new word for the text encoder; only its embedding row(s) learn.

The token (and `token_1 ... token_{N-1}` for `--num-vectors N`, diffusers' naming) is added to the
tokenizer, the embedding matrix grows, the new rows start from `--init-token`'s embedding (a
phrase of N tokens for N vectors: one row each). The optimizer sees the embedding matrix, and
after every step all the other rows are copied back from the base, so they stay bit-identical;
every other parameter is frozen. Prompts that name the token expand to all its vectors. Saved as
`learned_embeds.safetensors` = {token: [N, dim]} (diffusers' `load_textual_inversion` format),
optionally also in the A1111/ComfyUI format ({"emb_params"}) as `<token>.safetensors`, the file
name being the prompt word in those UIs.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..config import TextualInversionConfig
from ..embeddings import save_embedding
from ..errors import AdaptError
from . import Method

# Prompt templates around the token, written for this project (the paper's idea: many contexts,
# so the embedding learns the concept and not one sentence).
TEMPLATES = {
    "object": [
        "a photo of a {token}", "an emoji of {token}", "a picture of a {token}", "a drawing of a {token}",
        "a rendering of a {token}", "an icon of a {token}", "a close-up picture of the {token}",
        "a small {token}", "a clean image of the {token}", "an illustration of one {token}",
    ],
    "style": [
        "an emoji in the style of {token}", "a picture in the style of {token}", "art in the style of {token}",
        "a drawing in the style of {token}", "an icon in the style of {token}", "a {token} style illustration",
        "a rendering, {token} style", "an image drawn like {token}",
    ],
}


def vector_tokens(token: str, num_vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def check_new_token(tokenizer, token: str) -> None:
    if token in tokenizer.get_vocab() or len(tokenizer(token, add_special_tokens=False).input_ids) == 1:
        raise AdaptError(f"the token {token!r} already exists in the vocabulary; pick a new word such as '<{token.strip('<>')}-ti>'")


def init_token_ids(tokenizer, init_token: str, num_vectors: int) -> list[int]:
    """The ids the token's `num_vectors` rows start from: a single-token word for every row, or a phrase of
    exactly `num_vectors` tokens, one per row (diffusers' advanced DreamBooth script's --initializer_concept).
    Starting from the token's own pieces (`--init-token "<sks>" --num-vectors 3` for the three tokens < sks >)
    gives the text encoder exactly the input it had before the token was a word."""
    ids = tokenizer(init_token, add_special_tokens=False).input_ids
    if len(ids) == 1:
        return ids * num_vectors
    if len(ids) != num_vectors:
        pieces = tokenizer.convert_ids_to_tokens(ids)
        raise AdaptError(f"--init-token {init_token!r} is {len(ids)} tokens ({' '.join(pieces)}); pass a single existing "
                         f"word (e.g. --init-token {pieces[0].replace('</w>', '') if pieces else 'cat'}), or --num-vectors "
                         f"{len(ids)} to start one vector from each token")
    return ids


class TextualInversionMethod(Method):
    """One new embedding row block per text encoder (SDXL: both, saved as clip_l / clip_g)."""

    estimate_kind = "embedding"

    def __init__(self, cfg: TextualInversionConfig, token: str):
        """`cfg` is checked when built (config.py); `token` is the new word ([data] token)."""
        self.token, self.init_token = token, cfg.init_token
        self.formats = ("diffusers",) if cfg.format == "diffusers" else ("diffusers", cfg.format)
        self.tokens = vector_tokens(token, cfg.num_vectors)
        self.trainable_modules = ("text_encoder",)

    @classmethod
    def from_configs(cls, configs: dict) -> "TextualInversionMethod":
        return cls(configs["textual_inversion"], configs["data"].token)

    @classmethod
    def settle(cls, configs: dict, prompt_given: bool) -> list[str] | None:
        """--init-token is required; --scale-lr scales [train] lr; without a prompt, the --property templates."""
        ti, train = configs["textual_inversion"], configs["train"]
        if not ti.init_token:
            raise AdaptError("textual inversion needs --init-token WORD: an existing word close to the concept, e.g. 'cat'")
        if ti.scale_lr:
            train.lr *= train.batch_size * train.grad_accum
        return None if prompt_given else TEMPLATES[ti.property]

    def prepare(self, components) -> None:
        import torch  # lazy: LIGHT module (plan loads the method class to settle its configs)

        self.trainable_modules = components.text_encoder_names
        self.rows = {}  # encoder name -> (new row ids, original weight, mask of rows to keep)
        for name, tok in zip(self.trainable_modules, components.tokenizers):
            te = getattr(components, name)
            init_ids = init_token_ids(tok, self.init_token, len(self.tokens))
            for t in self.tokens:
                check_new_token(tok, t)
            tok.add_tokens(self.tokens)
            ids = tok.convert_tokens_to_ids(self.tokens)
            with torch.random.fork_rng(devices=[]):  # its random new rows (overwritten below) leave the seeded draws
                te.resize_token_embeddings(len(tok), mean_resizing=False)  # after it (a LoRA's init) as they were
            weight = te.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = weight[init_ids].clone()
            keep = torch.ones(weight.shape[0], dtype=torch.bool)
            keep[ids] = False
            self.rows[name] = (ids, weight.detach().clone(), keep)
            te.requires_grad_(False)
            weight.requires_grad_(True)
        self.ids = self.rows["text_encoder"][0]

    def _weight(self, components, name):
        return _unwrap(getattr(components, name)).get_input_embeddings().weight

    def trainable_parameters(self, components) -> list:
        return [self._weight(components, n) for n in self.trainable_modules]

    def parameter_groups(self, components) -> dict[str, list]:
        return {"embedding": self.trainable_parameters(components)}

    def after_step(self, components) -> None:
        import torch  # lazy: LIGHT module (plan loads the method class to settle its configs)

        with torch.no_grad():
            for name, (_, original, keep) in self.rows.items():
                weight = self._weight(components, name)
                weight[keep] = original[keep].to(weight.dtype)

    def prompt(self, text: str) -> str:
        return expand_prompt(text, self.token, len(self.tokens))

    def learned(self, components) -> dict:
        """{"text_encoder": [N, dim], ("text_encoder_2": [N, dim2])} of the new rows."""
        return {name: self._weight(components, name)[ids].detach().float().cpu().contiguous()
                for name, (ids, _, _) in self.rows.items()}

    def save(self, components, out_dir, recipe: dict) -> None:
        save_embedding(self.learned(components), self.token, Path(out_dir), recipe, self.formats)


def _unwrap(module):
    """The model inside a DistributedDataParallel wrapper (multi-process training)."""
    return getattr(module, "module", module)


def expand_prompt(prompt: str, token: str, num_vectors: int) -> str:
    """'a <t> cat' -> 'a <t> <t>_1 <t>_2 cat' for a 3-vector token (whole-word matches only)."""
    if num_vectors == 1:
        return prompt
    pattern = re.compile(rf"(?<!\S){re.escape(token)}(?!\S)")
    return pattern.sub(" ".join(vector_tokens(token, num_vectors)), prompt)
