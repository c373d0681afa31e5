"""LoRA files in both layouts users meet, and arithmetic on them.

In memory a LoRA is a dict {"unet.<module path>" | "text_encoder.<module path>": Lora(down, up,
alpha)}; the module's update is (alpha / rank) * up @ down. Two file layouts are read and written:

* diffusers / peft: `unet.<path>.lora.down.weight` / `.lora.up.weight` (also `lora_A`/`lora_B`,
  `lora_linear_layer`), alpha in the `lora_adapter_metadata` peft config (or `.alpha` keys);
* kohya / A1111 / ComfyUI: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`, `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders, `ss_*` metadata; SDXL
  UNet paths in Stability's layout (input_blocks / middle_block / output_blocks), as kohya's
  trainer writes them. Module names in both layouts: lora_names.py.

A key that names no module of an SD/SDXL UNet or CLIP text encoder is an error naming the file
and the first such keys, or with `lenient` a warning, and the key is left out: nothing is ever
written with a module that no loader can place.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch  # save_file looked up at call time (tests patch it)
import torch

from .config import check_lora_format
from .errors import AdaptError
from .fileio import atomic_path, read_safetensors
from .untrusted import check_lora_pair
from .lora_names import SDXL_VERSION, from_kohya_name, is_module_key, is_sdxl, module_key, to_kohya_name

log = logging.getLogger("adapt")

_KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


@dataclass
class Lora:
    down: object  # torch.Tensor [r, in] (or [r, in, kh, kw] for convolutions)
    up: object  # torch.Tensor [out, r] (or [out, r, 1, 1])
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self):
        """The weight update (alpha / r) * up @ down, shaped like the module's weight."""
        down = self.down.flatten(1).float()
        up = self.up.flatten(1).float()
        d = (up @ down) * self.scale
        return d.reshape(self.up.shape[0], *self.down.shape[1:]) if self.down.ndim == 4 else d


_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.(lora\.down|lora\.up|lora_linear_layer\.down|lora_linear_layer\.up|lora_A|lora_B)(?:\.default)?\.weight$")


def _peft_alpha(meta: dict, component: str, module_path: str, rank: int) -> float:
    """alpha of one module from diffusers' `lora_adapter_metadata` (peft config), else = rank."""
    try:
        cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        cfg = {}
    for pattern, value in (cfg.get(f"{component}.alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern) or re.fullmatch(pattern, module_path):
            return float(value)
    if f"{component}.lora_alpha" in cfg:
        return float(cfg[f"{component}.lora_alpha"])
    return float(rank)


def is_kohya(tensors: dict) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) for k in tensors)


def read_lora(path: str | Path, allow_pickle: bool = False, lenient: bool = False) -> tuple[dict[str, Lora], dict]:
    """(modules, metadata) of a diffusers/peft or kohya LoRA file (safetensors; pickle only with allow_pickle)."""
    tensors, meta = read_safetensors(path, "LoRA", allow_pickle)
    return parse_lora(tensors, meta, path, lenient), meta


def _place(key: str, kohya: bool) -> tuple[str, str] | None:
    """(module key, "down" | "up" | "alpha") of one tensor name, or None when it fits no module."""
    if kohya:
        name, _, kind = key.partition(".")
        slot, module = _KOHYA_SLOTS.get(kind), from_kohya_name(name)
        return (module, slot) if slot and module else None
    if key.endswith(".alpha"):
        component, _, path = key[:-len(".alpha")].partition(".")
        module, slot = module_key(component, path), "alpha"
    else:
        m = _DIFFUSERS_KEY.match(key)
        if not m:
            return None
        module, slot = module_key(m.group(1), m.group(2)), "down" if m.group(3).endswith(("down", "A")) else "up"
    return (module, slot) if is_module_key(module) else None


def report_unplaced(path, unplaced: list[str], total: int, lenient: bool, where: str, noun: str = "keys") -> None:
    """Entries of the LoRA file `path` that fit no module of `where`: an error naming the first of
    them, or with `lenient` a warning with their count (the caller leaves them out)."""
    if not unplaced:
        return
    first = ", ".join(unplaced[:3]) + (", ..." if len(unplaced) > 3 else "")
    if lenient:
        log.warning("%s: left out %d of %d LoRA %s that fit no module of %s (%s)", path, len(unplaced), total, noun, where, first)
        return
    raise AdaptError(f"{path}: {len(unplaced)} of {total} LoRA {noun} fit no module of {where}: {first}. Is the file for "
                     "another model, or a variant adapt does not read (LoHa, LoKr)? Pass --lenient to leave them out")


def parse_lora(tensors: dict, meta: dict, path: str | Path, lenient: bool = False) -> dict[str, Lora]:
    """The tensors of a LoRA file (either layout, either SDXL UNet layout) as {component.module_path:
    Lora}; `path` names the file in errors. Keys that fit no module: see report_unplaced."""
    if not tensors:
        raise AdaptError(f"{path} holds no tensors; pass a LoRA file")
    kohya = is_kohya(tensors)
    parts: dict[str, dict] = {}
    unplaced = []
    for k, v in tensors.items():
        placed = _place(k, kohya)
        if placed is None:
            unplaced.append(k)
        else:
            parts.setdefault(placed[0], {})[placed[1]] = v
    report_unplaced(path, unplaced, len(tensors), lenient, "a Stable Diffusion UNet or CLIP text encoder")
    if not parts:
        raise AdaptError(f"{path}: no key fits a module of a Stable Diffusion UNet or CLIP text encoder; pass a LoRA file")
    loras = {}
    for key, p in parts.items():
        if "down" not in p or "up" not in p:
            raise AdaptError(f"{path}: module {key} lacks its {'up' if 'down' in p else 'down'} weight")
        check_lora_pair(key, p["down"], p["up"], path)
        rank = int(p["down"].shape[0])
        component, module_path = key.split(".", 1)
        alpha = float(p["alpha"]) if "alpha" in p else _peft_alpha(meta, component, module_path, rank)
        if not math.isfinite(alpha):
            raise AdaptError(f"LoRA file {path}: module {key} has alpha {alpha}; the file is broken: use another file")
        loras[key] = Lora(p["down"].float(), p["up"].float(), alpha)
    return loras


def _common_rank(loras) -> int:
    """The most common rank of the modules (the smallest of the most common on a tie)."""
    counts = Counter(lo.rank for lo in loras)
    return min(counts, key=lambda r: (-counts[r], r))


def _scale_one(loras: dict[str, Lora]) -> dict[str, Lora]:
    """Same update, kept as it is when one (rank, alpha) holds for the whole file, else with each
    module's scale folded into its up matrix (alpha = its rank, scale 1): the convention diffusers
    assumes for modules whose rank differs from the file's most common one."""
    if len({(lo.rank, lo.alpha) for lo in loras.values()}) == 1:
        return loras
    return {k: Lora(lo.down, lo.up * lo.scale, float(lo.rank)) for k, lo in loras.items()}


def _one_alpha(loras: dict[str, Lora]) -> dict[str, Lora]:
    """Same update with ONE alpha for the whole file (the most common rank; ranks may still vary):
    diffusers' reader of kohya files applies one alpha to every module (ComfyUI and A1111 read
    each module's)."""
    if len({(lo.rank, lo.alpha) for lo in loras.values()}) == 1:
        return loras
    alpha = float(_common_rank(loras.values()))
    return {k: Lora(lo.down, lo.up * (lo.scale * lo.rank / alpha), alpha) for k, lo in loras.items()}


def write_lora(path: str | Path, loras: dict[str, Lora], fmt: str = "diffusers", metadata: dict | None = None,
               sdxl: bool | None = None) -> Path:
    """Write `loras` as one safetensors file in `fmt` (diffusers or kohya), atomically. `sdxl`
    (default: lora_names.is_sdxl of the modules and metadata) picks kohya's SDXL names. Modules
    may differ in rank: the diffusers layout says so in peft's rank_pattern, the kohya layout
    through the shapes, with one alpha for the whole file (see _one_alpha)."""
    check_lora_format(fmt)
    if not loras:
        raise AdaptError("nothing to write: the LoRA has no modules")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if sdxl is None:
        sdxl = is_sdxl(loras, meta)
    if sdxl:
        meta.setdefault("ss_base_model_version", SDXL_VERSION)
    tensors = _kohya_tensors(loras, meta, sdxl) if fmt == "kohya" else _diffusers_tensors(loras, meta)
    path = Path(path)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


def _kohya_tensors(loras: dict[str, Lora], meta: dict, sdxl: bool) -> dict:
    loras, tensors = _one_alpha(loras), {}
    for key, lo in sorted(loras.items()):
        name = to_kohya_name(key, sdxl)
        tensors[f"{name}.lora_down.weight"] = lo.down.contiguous()
        tensors[f"{name}.lora_up.weight"] = lo.up.contiguous()
        tensors[f"{name}.alpha"] = torch.tensor(float(lo.alpha))
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(lo.rank for lo in loras.values())),
                 "ss_network_alpha": str(max(lo.alpha for lo in loras.values()))})
    return tensors


def _diffusers_tensors(loras: dict[str, Lora], meta: dict) -> dict:
    """diffusers' keys, and peft's config per component in `lora_adapter_metadata`: r and
    lora_alpha of the most common rank, rank_pattern / alpha_pattern for modules of other ranks
    (full module paths, which peft matches as regexes ending at a module name)."""
    loras = _scale_one(loras)
    tensors, adapter_meta = {}, {}
    for component in sorted({k.split(".", 1)[0] for k in loras}):
        mine = {k.split(".", 1)[1]: lo for k, lo in sorted(loras.items()) if k.split(".", 1)[0] == component}
        rank = _common_rank(mine.values())
        alpha = next(lo.alpha for lo in mine.values() if lo.rank == rank)
        # diffusers' spelling: `.lora.down` for the UNet, `.lora_linear_layer.down` for text encoders
        infix = "lora" if component == "unet" else "lora_linear_layer"
        for module_path, lo in mine.items():
            tensors[f"{component}.{module_path}.{infix}.down.weight"] = lo.down.contiguous()
            tensors[f"{component}.{module_path}.{infix}.up.weight"] = lo.up.contiguous()
        adapter_meta.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                             f"{component}.target_modules": list(mine)})
        others = {path: lo for path, lo in mine.items() if lo.rank != rank}
        if others:
            adapter_meta[f"{component}.rank_pattern"] = {path: lo.rank for path, lo in others.items()}
            adapter_meta[f"{component}.alpha_pattern"] = {path: lo.alpha for path, lo in others.items()}
    meta["lora_adapter_metadata"] = json.dumps(adapter_meta, sort_keys=True)
    return tensors


def combine(weighted: list[tuple[dict[str, Lora], float]]) -> dict[str, Lora]:
    """One LoRA that is exactly sum_i w_i * (alpha_i / r_i) * B_i A_i: ranks concatenated, each
    file's weight and scale folded into its up matrix (alpha = total rank, so scale 1)."""
    keys = sorted({k for loras, _ in weighted for k in loras})
    out = {}
    for key in keys:
        parts = [(lo[key], w) for lo, w in weighted if key in lo]
        shapes = {(p.up.shape[0], *p.down.shape[1:]) for p, _ in parts}
        if len(shapes) > 1:
            raise AdaptError(f"the LoRAs disagree on the shape of {key} ({shapes}); were they made for different models?")
        down = torch.cat([p.down for p, _ in parts])
        up = torch.cat([p.up * (w * p.scale) for p, w in parts], dim=1)
        out[key] = Lora(down, up, float(down.shape[0]))
    return out


def reduce_rank(loras: dict[str, Lora], rank: int) -> tuple[dict[str, Lora], float]:
    """Best rank-`rank` approximation of each module's update (truncated SVD); returns the LoRA
    and the relative error ||dW - dW_r||_F / ||dW||_F over all modules together."""
    if rank < 1:
        raise AdaptError(f"--rank must be >= 1, got {rank}")
    out, err2, total2 = {}, 0.0, 0.0
    for key, lo in loras.items():
        delta = lo.delta()
        flat = delta.flatten(1).double()
        u, s, vh = torch.linalg.svd(flat, full_matrices=False)
        r = min(rank, s.shape[0])
        up = (u[:, :r] * s[:r]).float()
        down = vh[:r].float()
        total2 += float((s ** 2).sum())
        err2 += float((s[r:] ** 2).sum())
        if r < rank:  # keep one rank per file
            down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])])
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
        if delta.ndim == 4:
            down = down.reshape(rank, *delta.shape[1:])
            up = up.reshape(delta.shape[0], rank, 1, 1)
        out[key] = Lora(down, up, float(rank))
    return out, math.sqrt(err2 / total2) if total2 > 0 else 0.0
