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
from .fileio import atomic_path, write_json

LORA_FILE = "pytorch_lora_weights.safetensors"
RECIPE_FILE = "recipe.json"


def _adapter_metadata(module, prefix: str) -> dict:
    cfg = module.peft_config["default"].to_dict()
    return {f"{prefix}.{k}": (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}


def save_lora(components, out_dir, recipe: dict) -> Path:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    tensors, adapter_meta = {}, {}
    for prefix, module in (("unet", components.unet), ("text_encoder", components.text_encoder)):
        if module is None or not getattr(module, "peft_config", None):
            continue
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        tensors.update({f"{prefix}.{k}": v.detach().float().contiguous().cpu() for k, v in state.items()})
        adapter_meta.update(_adapter_metadata(module, prefix))
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(adapter_meta, indent=2, sort_keys=True),
        "adapt.recipe": json.dumps(recipe, sort_keys=True),
    }
    path = Path(out_dir) / LORA_FILE
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_json(Path(out_dir) / RECIPE_FILE, recipe)
    return path


def read_safetensors(path: str | Path, what: str = "weights"):
    """(tensors, metadata) of a .safetensors file, or a one-line error. No pickle here."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise AdaptError(f"{what} file {path} not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise AdaptError(f"{path} is not a readable .safetensors {what} file ({e}); "
                         "adapt reads safetensors only") from None


def lora_recipe(path: str | Path) -> dict:
    """The recipe stored in a LoRA file by adapt ({} for files made elsewhere)."""
    _, meta = read_safetensors(path, "LoRA")
    return json.loads(meta.get("adapt.recipe", "{}"))


def save_pipeline(components, out_dir, recipe: dict) -> Path:
    """Write a full diffusers pipeline folder: trained modules from memory, the rest copied from
    the base folder (they did not change, and may have been released after caching)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src = Path(components.source)
    trained = {"unet": components.unet}
    if components.text_encoder is not None and any(p.requires_grad for p in components.text_encoder.parameters()):
        trained["text_encoder"] = components.text_encoder
    for entry in sorted(src.iterdir()):
        if entry.name in trained or entry.name.startswith("."):
            continue
        dest = out_dir / entry.name
        partial = out_dir / f".{entry.name}.partial"
        if entry.is_dir():
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(entry, partial)
        else:
            shutil.copy2(entry, partial)
        if dest.is_dir():
            shutil.rmtree(dest)
        partial.replace(dest)
    for name, module in trained.items():
        partial = out_dir / f".{name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        module.save_pretrained(partial, safe_serialization=True)
        dest = out_dir / name
        if dest.exists():
            shutil.rmtree(dest)
        partial.replace(dest)
    write_json(out_dir / RECIPE_FILE, recipe)
    return out_dir
