"""Reading and writing artifacts: LoRA files and pipeline folders, always with their recipe.

LoRA files use the diffusers/peft key layout (`unet.<module path>.lora_A.weight` / `lora_B`) and
carry peft's adapter config under the `lora_adapter_metadata` key exactly as diffusers'
`save_lora_weights` writes it, so `load_lora_weights` rebuilds the same alpha/rank scale. The
run's recipe is stored beside it under `adapt.recipe`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .errors import AdaptError
from .fileio import atomic_dir, atomic_path, write_json

LORA_FILE = "pytorch_lora_weights.safetensors"
RECIPE_FILE = "recipe.json"


def peft_loras(components) -> dict:
    """The trained peft adapters of the UNet / text encoder as {component.module_path: Lora}."""
    from peft.utils import get_peft_model_state_dict

    from .loras import Lora

    out = {}
    for prefix in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(components, prefix, None)
        if module is None or not getattr(module, "peft_config", None):
            continue
        alpha = float(module.peft_config["default"].lora_alpha)
        state = get_peft_model_state_dict(module)
        for key, down in state.items():
            if ".lora_A." in key:
                path = key.split(".lora_A.")[0]
                up = state[key.replace(".lora_A.", ".lora_B.")]
                out[f"{prefix}.{path}"] = Lora(down.detach().float().cpu(), up.detach().float().cpu(), alpha)
    return out


def save_lora(components, out_dir, recipe: dict, fmt: str = "diffusers") -> Path:
    """The run's LoRA file: diffusers layout as `pytorch_lora_weights.safetensors`, or kohya
    layout as `<run folder name>.safetensors` (the name A1111 shows), with the recipe inside."""
    from .loras import write_lora

    out_dir = Path(out_dir)
    name = LORA_FILE if fmt == "diffusers" else f"{out_dir.resolve().name}.safetensors"
    path = write_lora(out_dir / name, peft_loras(components), fmt, {"adapt.recipe": json.dumps(recipe, sort_keys=True)})
    write_json(out_dir / RECIPE_FILE, recipe)
    return path


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_safetensors(path: str | Path, what: str = "weights", allow_pickle: bool = False):
    """(tensors, metadata) of a .safetensors file, or a one-line error.

    Pickle files (.pt/.bin/.ckpt) are read only with allow_pickle (the user's --allow-pickle),
    with a warning, and even then through torch.load(weights_only=True): tensors, numbers and
    strings only, never arbitrary objects. Nested dicts (A1111 embeddings) are flattened with '.'.
    """
    from safetensors import SafetensorError, safe_open

    from .untrusted import check_safetensors

    path = Path(path)
    if not path.is_file():
        raise AdaptError(f"{what} file {path} not found")
    try:
        check_safetensors(path)  # a crafted or truncated header: a ValueError naming the tensor, nothing allocated
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e)
    if not allow_pickle:
        hint = (" It looks like a pickle file: convert it to safetensors, or pass --allow-pickle if you trust"
                " where it came from (pickle files can run code).") if path.suffix.lower() in PICKLE_SUFFIXES else ""
        raise AdaptError(f"{path} is not a readable .safetensors {what} file ({reason}); adapt reads safetensors only.{hint}")
    import logging

    import torch

    logging.getLogger("adapt").warning("--allow-pickle: reading pickle file %s (tensors only, weights_only=True); "
                                       "only do this for files you trust", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure: corrupt file or objects that weights_only refuses
        raise AdaptError(f"{path} is neither safetensors nor a tensors-only pickle ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"emb_params": obj}
    flat: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", obj)
    meta = {"adapt.pickle": "1"}
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        meta["adapt.pickle_name"] = obj["name"]
    return flat, meta


def save_pipeline(components, out_dir, recipe: dict) -> Path:
    """Write a full diffusers pipeline folder: trained modules from memory, the rest copied from
    the base folder (they did not change, and may have been released after caching). Each
    component folder appears whole or not at all."""
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
        else:
            with atomic_path(out_dir / entry.name) as tmp:
                shutil.copy2(entry, tmp)
    for name, module in trained.items():
        with atomic_dir(out_dir / name) as tmp:
            module.save_pretrained(tmp, safe_serialization=True)
    write_json(out_dir / RECIPE_FILE, recipe)
    return out_dir
