"""Writing a run's artifacts: LoRA files and pipeline folders, always with their recipe (reading: loras.py, models.py).

A LoRA run writes two small files by default: `pytorch_lora_weights.safetensors` in diffusers'
layout (with peft's adapter config in `lora_adapter_metadata`, as `save_lora_weights` writes it,
so `load_lora_weights` rebuilds the same alpha/rank scale) and `<run folder>.safetensors` in
kohya's layout, the one ComfyUI and A1111/Forge load. The recipe is inside both (`adapt.recipe`).
A DoRA run writes only the first, a LoHa / LoKr run only the second (config.ADAPTER_LAYOUTS).
A pivotal-tuning run also writes its token's embedding: beside them as `learned_embeds.safetensors`
(named in the diffusers file's metadata) and inside the kohya file (embeddings.bundle_tensors).

Pipeline folders keep the standard CLIP key layout (`text_model.` prefix, as transformers 4.x
writes it and ComfyUI detects it), which transformers 5 still reads; they keep the base's
scheduler config and `adapt.json`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import safetensors.torch  # save_file looked up at call time (tests patch it)
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

from .embeddings import EMBEDDING_META, EMBEDS_FILE, bundle_tensors, save_embedding
from .fileio import RECIPE_FILE, atomic_dir, atomic_path, write_json
from .lora_names import module_key
from .loras import Lora, write_lora
from .lycoris import MAGNITUDE, SLOTS, from_peft
from .models import DEFAULTS_FILE

log = logging.getLogger("adapt")

LORA_FILE = "pytorch_lora_weights.safetensors"
RAW_DIR = "raw"  # with --ema-decay and --save-ema both: the trained (not averaged) weights' artifact


_PEFT_KEY = re.compile(rf"^(.+)\.(lora_A|lora_B|{MAGNITUDE}|{'|'.join(SLOTS)})(?:\.weight)?$")


def peft_loras(components) -> dict:
    """The trained peft adapters of the UNet / text encoder as {component.module_path: Lora | Lycoris}:
    LoRA and DoRA as Lora (rsLoRA's scale alpha / sqrt(r) written as the plain alpha * sqrt(r) / r,
    so every reader applies it), LoHa and LoKr as lycoris.Lycoris."""
    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(components, prefix, None)
        if module is None or not getattr(module, "peft_config", None):
            continue
        cfg = module.peft_config["default"]
        modules: dict[str, dict] = {}
        for key, tensor in get_peft_model_state_dict(module).items():
            path, slot = _PEFT_KEY.match(key).groups()
            modules.setdefault(path, {})[slot] = tensor.detach().float().cpu()
        for path, parts in modules.items():
            out[module_key(prefix, path)] = _from_peft(cfg, parts)
    return out


def _from_peft(cfg, parts: dict):
    algo = cfg.peft_type.value.lower()  # lora (with DoRA), loha, lokr
    if algo != "lora":
        return from_peft(algo, parts, cfg.alpha, cfg.r)
    rank = parts["lora_A"].shape[0]
    alpha = cfg.lora_alpha * (math.sqrt(rank) if cfg.use_rslora else 1.0)
    return Lora(parts["lora_A"], parts["lora_B"], float(alpha), parts.get(MAGNITUDE))


def save_lora(components, out_dir, recipe: dict, layouts=("diffusers", "kohya"), embedding: tuple | None = None) -> list[Path]:
    """The run's LoRA file(s), each with the recipe inside: diffusers layout as
    `pytorch_lora_weights.safetensors`, kohya layout as `<run folder name>.safetensors` (the name
    ComfyUI and A1111 show); `layouts` (config.LoraConfig.layouts) says which. `embedding`: a pivotal
    run's (token, {encoder: [N, dim]}), written beside them as learned_embeds.safetensors (which the
    diffusers file's metadata names) and bundled inside the kohya file, where A1111 reads it."""
    out_dir = Path(out_dir)
    loras, meta = peft_loras(components), {"adapt.recipe": json.dumps(recipe, sort_keys=True)}
    if embedding is not None:
        save_embedding(embedding[1], embedding[0], out_dir, recipe)
    written = [write_lora(out_dir / (LORA_FILE if layout == "diffusers" else kohya_file_name(out_dir)), loras, layout,
                          {**meta, **({EMBEDDING_META: EMBEDS_FILE} if embedding and layout == "diffusers" else {})},
                          sdxl=components.is_sdxl, extra=bundle_tensors(*embedding) if embedding and layout == "kohya" else None)
               for layout in layouts]
    write_json(out_dir / RECIPE_FILE, recipe)
    for path in written:
        where = "diffusers' load_lora_weights" if path.name == LORA_FILE else "ComfyUI models/loras, A1111/Forge models/Lora"
        log.info("LoRA file %s (%s)", path, where)
    return written


def write_lora_outputs(output, loras: dict, fmt: str | None, meta: dict, sdxl: bool) -> list[Path]:
    """A LoRA where a LoRA tool's --output says: a `.safetensors` path is one file in `fmt` (default
    diffusers); any other path is a folder holding the files a LoRA run writes (`fmt` default both)."""
    output = Path(output)
    if output.suffix == ".safetensors":
        return [write_lora(output, loras, fmt or "diffusers", meta, sdxl=sdxl)]
    fmt = fmt or "both"
    return [write_lora(output / (LORA_FILE if layout == "diffusers" else kohya_file_name(output)), loras, layout, meta, sdxl=sdxl)
            for layout in (("diffusers", "kohya") if fmt == "both" else (fmt,))]


def kohya_file_name(out_dir: Path) -> str:
    """`<run folder name>.safetensors`: the LoRA's name in ComfyUI's and A1111's lists (in a run's
    raw/ folder, `<run folder name>-raw.safetensors`)."""
    out_dir = Path(out_dir).resolve()
    name = f"{out_dir.parent.name}-raw.safetensors" if out_dir.name == RAW_DIR else f"{out_dir.name}.safetensors"
    return name if name != LORA_FILE else name.replace(".safetensors", "-kohya.safetensors")


def save_pipeline(components, out_dir, recipe: dict) -> Path:
    """Write a full diffusers pipeline folder: trained modules from memory, the rest copied from
    the base folder (they did not change, and may have been released after caching). Each
    component folder appears whole or not at all, text encoders in the standard CLIP key layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(components.source)
    trained = {"unet": components.unet}
    for name in components.text_encoder_names:
        module = getattr(components, name)
        if module is not None and any(p.requires_grad for p in module.parameters()):
            trained[name] = module
    for entry in sorted(src.iterdir()):
        if entry.name in trained or entry.name.startswith("."):
            continue
        if entry.is_dir():
            with atomic_dir(out_dir / entry.name) as tmp:
                shutil.copytree(entry, tmp, dirs_exist_ok=True)
                standard_clip_keys(tmp)
        else:
            with atomic_path(out_dir / entry.name) as tmp:
                shutil.copy2(entry, tmp)
    for name, module in trained.items():
        with atomic_dir(out_dir / name) as tmp:
            module.save_pretrained(tmp, safe_serialization=True)
            standard_clip_keys(tmp)
    write_json(out_dir / RECIPE_FILE, recipe)
    return out_dir


def save_fused_pipeline(pipe, base: Path, out_dir, recipe: dict) -> Path:
    """`pipe` (LoRAs fused into its weights) as a pipeline folder, whole or not at all, that samples
    like its base: the base's scheduler config and adapt.json, not the sampler used while fusing."""
    base = Path(base)
    with atomic_dir(out_dir) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(tmp / "scheduler")
        shutil.copytree(base / "scheduler", tmp / "scheduler")
        index = json.loads((tmp / "model_index.json").read_text())
        index["scheduler"] = json.loads((base / "model_index.json").read_text())["scheduler"]
        write_json(tmp / "model_index.json", index)
        if (base / DEFAULTS_FILE).is_file():
            shutil.copy2(base / DEFAULTS_FILE, tmp / DEFAULTS_FILE)
        for folder in tmp.iterdir():
            if folder.is_dir():
                standard_clip_keys(folder)
        write_json(tmp / RECIPE_FILE, recipe)
    return Path(out_dir)


def standard_clip_keys(folder: Path) -> None:
    """Give a saved CLIP text encoder (a folder whose config.json says clip_text_model) the
    standard key layout, `text_model.` before every key but `text_projection`: transformers 5
    saves CLIPTextModel without it, which transformers 4.x loads as random weights."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return
    if config.get("model_type") != "clip_text_model":
        return
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            keys, meta = list(f.keys()), f.metadata()
            if all(_standard_clip_key(k) == k for k in keys):
                continue
            tensors = {_standard_clip_key(k): f.get_tensor(k) for k in keys}
        with atomic_path(file) as tmp:
            safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = json.loads(index.read_text())
        data["weight_map"] = {_standard_clip_key(k): v for k, v in data.get("weight_map", {}).items()}
        write_json(index, data)


def _standard_clip_key(key: str) -> str:
    return key if key.startswith(("text_model.", "text_projection.")) else f"text_model.{key}"
