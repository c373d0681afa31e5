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
EMBEDDING_META = "adapt.embedding"  # a pivotal-tuning LoRA file's metadata: the file name of its embedding, beside it
# An embedding inside a LoRA file, as A1111 reads it (extensions-builtin/Lora/networks.py, load_network: a key
# `bundle_emb.<name>.<rest>` is split at its first two dots; `string_to_param.*` or `clip_l` + `clip_g` are then
# read by modules/textual_inversion/textual_inversion.py, create_embedding_from_data); <name> is the prompt word.
BUNDLE_PREFIX = "bundle_emb."


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


def bundle_tensors(token: str, embeds: dict) -> dict:
    """The kohya LoRA file's keys for a pivotal run's embedding (`embeds` as save_embedding's): SD 1.x/2.x
    `bundle_emb.<token>.string_to_param.*` [N, dim]; SDXL `bundle_emb.<token>.clip_l` and `.clip_g`."""
    if "text_encoder_2" in embeds:
        return {f"{BUNDLE_PREFIX}{token}.clip_l": embeds["text_encoder"], f"{BUNDLE_PREFIX}{token}.clip_g": embeds["text_encoder_2"]}
    return {f"{BUNDLE_PREFIX}{token}.string_to_param.*": embeds["text_encoder"]}


def bundled_embeddings(tensors: dict) -> dict:
    """{prompt word: tensor [N, dim] (or SDXL's {"text_encoder": clip_l, "text_encoder_2": clip_g})} of the
    embeddings bundled in a LoRA file's tensors, read as A1111 reads them (BUNDLE_PREFIX)."""
    found: dict[str, dict] = {}
    for key, tensor in tensors.items():
        if key.startswith(BUNDLE_PREFIX):
            name, _, part = key[len(BUNDLE_PREFIX):].partition(".")
            found.setdefault(name, {})[part] = tensor
    out = {}
    for name, parts in found.items():
        if {"clip_l", "clip_g"} <= parts.keys():
            out[name] = {"text_encoder": parts["clip_l"], "text_encoder_2": parts["clip_g"]}
        elif len(parts) == 1:  # string_to_param.* (or another single tensor, which A1111 also takes)
            out[name] = next(iter(parts.values()))
        else:
            raise AdaptError(f"the LoRA file's bundled embedding {name!r} has parts {', '.join(sorted(parts))}; expected "
                             "string_to_param.* (SD 1.x/2.x) or clip_l and clip_g (SDXL)")
    return out


def lora_embeddings(path, tensors: dict, meta: dict, allow_pickle: bool = False) -> list[tuple[str, object, str]]:
    """[(token, embedding, where it came from)] that a pivotal-tuning LoRA file brings: bundled in it (kohya
    file), else the file its metadata names (EMBEDDING_META), which must lie beside it (diffusers file)."""
    bundled = bundled_embeddings(tensors)
    if bundled:
        return [(name, emb, f"{path} (bundled)") for name, emb in bundled.items()]
    if not meta.get(EMBEDDING_META):
        return []
    beside = Path(path).parent / Path(meta[EMBEDDING_META]).name  # a name, never a path elsewhere (the file is untrusted)
    if not beside.is_file():
        raise AdaptError(f"LoRA {path} was trained with its token's embedding, {beside.name}, which is not beside it; "
                         f"copy {beside.name} from the run folder next to the LoRA file")
    token, emb = read_embedding(beside, allow_pickle=allow_pickle)
    return [(token, emb, str(beside))]
