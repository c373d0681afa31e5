"""Textual-inversion embedding files: diffusers' `learned_embeds.safetensors` ({token: [N, dim]}),
the A1111/ComfyUI file (`<token>.safetensors`, {"emb_params": [N, dim]}), and SDXL's clip_l + clip_g
pair. Written by the textual-inversion method, read by inference."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .errors import AdaptError
from .fileio import RECIPE_FILE, atomic_path, read_safetensors, write_json

log = logging.getLogger("adapt")

EMBEDS_FILE = "learned_embeds.safetensors"


def save_embedding(embeds: dict, token: str, out_dir: Path, recipe: dict, formats=("diffusers",)) -> list[Path]:
    """embeds = {"text_encoder": [N, dim]} (SD) or with "text_encoder_2" too (SDXL). SD files:
    {token: [N, dim]} (diffusers) / {"emb_params": ...} (A1111); SDXL files hold "clip_l" and
    "clip_g", the layout diffusers' loaders and ComfyUI read."""
    # lazy: LIGHT module (methods.textual_inversion, which plan loads, imports it)
    from safetensors.torch import save_file

    meta = {"format": "pt", "adapt.recipe": json.dumps(recipe, sort_keys=True), "adapt.token": token}
    sdxl = "text_encoder_2" in embeds
    written = []
    for fmt in formats:
        if sdxl:
            tensors = {"clip_l": embeds["text_encoder"], "clip_g": embeds["text_encoder_2"]}
        else:
            tensors = {token if fmt == "diffusers" else "emb_params": embeds["text_encoder"]}
        path = out_dir / EMBEDS_FILE if fmt == "diffusers" else a1111_file(out_dir, token)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        written.append(path)
    write_json(out_dir / RECIPE_FILE, recipe)  # beside the files too, as LoRA and pipeline runs have it
    return written


def a1111_file(out_dir: Path, token: str) -> Path:
    """`<token>.safetensors`: A1111/Forge and ComfyUI take an embedding's prompt word from its file
    name. Characters file names cannot carry on every system (`<>:"/\\|?*`, ...) are left out; a
    name that would clash with the diffusers file goes in its own folder `a1111/`."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "", token) or "embedding"
    path = (out_dir / "a1111" if name.lower() == Path(EMBEDS_FILE).stem else out_dir) / f"{name}.safetensors"
    log.info("A1111/ComfyUI embedding %s: put it in stable-diffusion-webui/embeddings (A1111/Forge) or "
             "ComfyUI/models/embeddings; the prompt word there is %s (ComfyUI: embedding:%s)", path, name, name)
    return path


def read_embedding(path: str | Path, token: str | None = None, allow_pickle: bool = False):
    """(token, tensor [N, dim]) from a diffusers or A1111/ComfyUI embedding file (safetensors;
    A1111 .pt pickles only with allow_pickle); for an SDXL file (clip_l + clip_g) the tensor is a
    dict {"text_encoder": clip_l, "text_encoder_2": clip_g}."""
    tensors, meta = read_safetensors(path, "embedding", allow_pickle)
    if {"clip_l", "clip_g"} <= tensors.keys():
        name = meta.get("adapt.token") or Path(path).name.split(".")[0]
        return token or name, {"text_encoder": tensors["clip_l"], "text_encoder_2": tensors["clip_g"]}
    if "string_to_param.*" in tensors:  # A1111 .pt
        tensors = {"emb_params": tensors["string_to_param.*"]}
    if "emb_params" in tensors:
        name = meta.get("adapt.token") or meta.get("adapt.pickle_name") or Path(path).name.split(".")[0]
        return token or name, tensors["emb_params"]
    if len(tensors) == 1:
        (name, emb), = tensors.items()
        return token or name, emb
    raise AdaptError(f"{path} is not a textual-inversion embedding (expected one tensor, or 'emb_params'; "
                     f"found {', '.join(sorted(tensors))[:120]})")
