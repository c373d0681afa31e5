"""LoRA files in both layouts users meet, and arithmetic on them.

In memory a LoRA is a dict {"unet.<module path>" | "text_encoder.<module path>": Lora(down, up,
alpha)}; the module's update is (alpha / rank) * up @ down. A DoRA module is a Lora with a
magnitude, a LoHa or LoKr module a lycoris.Lycoris (their maths: lycoris.py); every module's
`weight_delta(W)` is the change it makes to the weight W. Two file layouts are read and written:

* diffusers / peft: `unet.<path>.lora.down.weight` / `.lora.up.weight` (also `lora_A`/`lora_B`,
  `lora_linear_layer`), alpha in the `lora_adapter_metadata` peft config (or `.alpha` keys);
* kohya / A1111 / ComfyUI: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`, `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders, `ss_*` metadata; SDXL
  UNet paths in Stability's layout (input_blocks / middle_block / output_blocks), as kohya's
  trainer writes them; LoHa / LoKr modules as LyCORIS writes them (`.hada_w1_a`, `.lokr_w1`, ...).
  Module names in both layouts: lora_names.py.

DoRA has no kohya file and LoHa / LoKr no diffusers one (config.ADAPTER_LAYOUTS says why), and
only plain LoRAs are merged into a LoRA file.

A key that names no module of an SD/SDXL UNet or CLIP text encoder is an error naming the file
and the first such keys, or with `lenient` a warning, and the key is left out: nothing is ever
written with a module that no loader can place. An embedding bundled in a kohya file (`bundle_emb.*`,
pivotal tuning; embeddings.py) is no module: left out here, with a warning; `generate` loads it.
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

from .config import check_adapter_layout, check_lora_format
from .embeddings import BUNDLE_PREFIX
from .errors import AdaptError
from .fileio import atomic_path, read_safetensors
from .lycoris import MAGNITUDE, NAMES, SLOTS, Lycoris, checked_magnitude, dora_delta, from_parts, kind
from .untrusted import check_lora_pair
from .lora_names import SDXL_VERSION, from_kohya_name, is_module_key, is_sdxl, module_key, to_kohya_name

log = logging.getLogger("adapt")

_KOHYA_SLOTS = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha", **{s: s for s in SLOTS}}


@dataclass
class Lora:
    down: object  # torch.Tensor [r, in] (or [r, in, kh, kw] for convolutions)
    up: object  # torch.Tensor [out, r] (or [out, r, 1, 1])
    alpha: float
    magnitude: object = None  # DoRA: torch.Tensor [out], the learned norm of each output row; None: plain LoRA

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self):
        """The low-rank update (alpha / r) * up @ down, shaped like the module's weight (DoRA: before
        its normalisation; weight_delta is the change)."""
        down = self.down.flatten(1).float()
        up = self.up.flatten(1).float()
        d = (up @ down) * self.scale
        return d.reshape(self.up.shape[0], *self.down.shape[1:]) if self.down.ndim == 4 else d

    def weight_delta(self, base):
        """The change to the weight `base` at weight 1: the update, or DoRA's (lycoris.dora_delta)."""
        d = self.delta()
        if d.numel() != base.numel():
            raise ValueError(f"an update of shape {list(d.shape)} for a weight of shape {list(base.shape)}")
        d = d.reshape(base.shape).to(base.device)
        return d if self.magnitude is None else dora_delta(base, d, self.magnitude)


_DIFFUSERS_SLOTS = {"lora.down": "down", "lora.up": "up", "lora_linear_layer.down": "down", "lora_linear_layer.up": "up",
                    "lora_A": "down", "lora_B": "up", MAGNITUDE: "magnitude"}
_DIFFUSERS_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+?)\.("
                            + "|".join(re.escape(k) for k in _DIFFUSERS_SLOTS) + r")(?:\.default)?(?:\.weight)?$")


def _peft_alpha(meta: dict, component: str, module_path: str, rank: int) -> float:
    """alpha of one module from diffusers' `lora_adapter_metadata` (peft config), else = rank."""
    try:
        cfg = json.loads(meta.get("lora_adapter_metadata", "{}"))
    except json.JSONDecodeError:
        cfg = {}
    for pattern, value in (cfg.get(f"{component}.alpha_pattern") or {}).items():
        if module_path == pattern or module_path.endswith("." + pattern) or re.fullmatch(pattern, module_path):
            return float(value)
    rs = math.sqrt(rank) if cfg.get(f"{component}.use_rslora") else 1.0  # rsLoRA: alpha / sqrt(r) = (alpha sqrt(r)) / r
    if f"{component}.lora_alpha" in cfg:
        return float(cfg[f"{component}.lora_alpha"]) * rs
    return float(rank) * rs


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
        module, slot = module_key(m.group(1), m.group(2)), _DIFFUSERS_SLOTS[m.group(3)]
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
                     "another model, or a variant adapt does not read (OFT, GLoRA, Tucker factors, kohya dora_scale)? Pass --lenient to leave them out")


def parse_lora(tensors: dict, meta: dict, path: str | Path, lenient: bool = False) -> dict[str, Lora | Lycoris]:
    """The tensors of a LoRA file (either layout, either SDXL UNet layout) as {component.module_path:
    Lora | Lycoris}; `path` names the file in errors. Keys that fit no module: see report_unplaced."""
    if not tensors:
        raise AdaptError(f"{path} holds no tensors; pass a LoRA file")
    if bundled := sorted({k[len(BUNDLE_PREFIX):].partition(".")[0] for k in tensors if k.startswith(BUNDLE_PREFIX)}):
        log.warning("%s: left out its bundled embedding(s) %s (only `generate --lora` loads them)", path, ", ".join(bundled))
        tensors = {k: v for k, v in tensors.items() if not k.startswith(BUNDLE_PREFIX)}
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
    return {key: _module(key, p, meta, path) for key, p in parts.items()}


def _module(key: str, p: dict, meta: dict, path) -> Lora | Lycoris:
    """One module of a LoRA file from its tensors {slot: tensor}."""
    if any(s in p for s in SLOTS):
        module = from_parts(key, p, path)
    else:
        if "down" not in p or "up" not in p:
            raise AdaptError(f"{path}: module {key} lacks its {'up' if 'down' in p else 'down'} weight")
        check_lora_pair(key, p["down"], p["up"], path)
        component, module_path = key.split(".", 1)
        alpha = float(p["alpha"]) if "alpha" in p else _peft_alpha(meta, component, module_path, int(p["down"].shape[0]))
        magnitude = None if "magnitude" not in p else checked_magnitude(key, p["magnitude"], p["up"].shape[0], path)
        module = Lora(p["down"].float(), p["up"].float(), alpha, magnitude)
    if module.alpha is not None and not math.isfinite(module.alpha):
        raise AdaptError(f"LoRA file {path}: module {key} has alpha {module.alpha}; the file is broken: use another file")
    return module


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
    return {k: Lora(lo.down, lo.up * lo.scale, float(lo.rank), lo.magnitude) for k, lo in loras.items()}


def _one_alpha(loras: dict[str, Lora]) -> dict[str, Lora]:
    """Same update with ONE alpha for the whole file (the most common rank; ranks may still vary):
    diffusers' reader of kohya files applies one alpha to every module (ComfyUI and A1111 read
    each module's). LoHa / LoKr modules keep their own alphas (diffusers reads none of them)."""
    if any(not isinstance(lo, Lora) for lo in loras.values()) or len({(lo.rank, lo.alpha) for lo in loras.values()}) == 1:
        return loras
    alpha = float(_common_rank(loras.values()))
    return {k: Lora(lo.down, lo.up * (lo.scale * lo.rank / alpha), alpha) for k, lo in loras.items()}


def write_lora(path: str | Path, loras: dict[str, Lora | Lycoris], fmt: str = "diffusers", metadata: dict | None = None,
               sdxl: bool | None = None, extra: dict | None = None) -> Path:
    """Write `loras` as one safetensors file in `fmt` (diffusers or kohya), atomically. `sdxl`
    (default: lora_names.is_sdxl of the modules and metadata) picks kohya's SDXL names. Modules
    may differ in rank: the diffusers layout says so in peft's rank_pattern, the kohya layout
    through the shapes, with one alpha for the whole file (see _one_alpha). `extra`: tensors written
    as they are (a pivotal run's embedding, embeddings.bundle_tensors)."""
    check_lora_format(fmt)
    if not loras:
        raise AdaptError("nothing to write: the LoRA has no modules")
    for variant in sorted({kind(lo) for lo in loras.values()}):
        check_adapter_layout(variant, fmt)
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    if sdxl is None:
        sdxl = is_sdxl(loras, meta)
    if sdxl:
        meta.setdefault("ss_base_model_version", SDXL_VERSION)
    tensors = {**(_kohya_tensors(loras, meta, sdxl) if fmt == "kohya" else _diffusers_tensors(loras, meta)), **(extra or {})}
    path = Path(path)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata=meta)
    return path


def _kohya_tensors(loras: dict[str, Lora | Lycoris], meta: dict, sdxl: bool) -> dict:
    loras, tensors = _one_alpha(loras), {}
    for key, lo in sorted(loras.items()):
        name = to_kohya_name(key, sdxl)
        if isinstance(lo, Lycoris):
            tensors.update({f"{name}.{slot}": t.contiguous() for slot, t in sorted(lo.parts.items())})
        else:
            tensors[f"{name}.lora_down.weight"] = lo.down.contiguous()
            tensors[f"{name}.lora_up.weight"] = lo.up.contiguous()
        if lo.alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(float(lo.alpha))
    algos = sorted({kind(lo) for lo in loras.values()} - {"lora"})  # LyCORIS's own metadata for its files
    meta.update({"ss_network_module": "lycoris.kohya" if algos else "networks.lora",
                 "ss_network_dim": str(max(lo.rank for lo in loras.values())),
                 "ss_network_alpha": str(max(lo.rank if lo.alpha is None else lo.alpha for lo in loras.values())),
                 **({"ss_network_args": json.dumps({"algo": ",".join(algos)})} if algos else {})})
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
            key = f"{component}.{module_path}"
            tensors[f"{key}.{infix}.down.weight"] = lo.down.contiguous()
            tensors[f"{key}.{infix}.up.weight"] = lo.up.contiguous()
            if lo.magnitude is not None:  # DoRA: diffusers reads `.lora_magnitude_vector.weight` with use_dora in the config
                tensors[f"{key}.{MAGNITUDE}.weight"] = lo.magnitude.contiguous()
                adapter_meta[f"{component}.use_dora"] = True
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
    file's weight and scale folded into its up matrix (alpha = total rank, so scale 1). Plain LoRAs
    only: a DoRA change depends on the base weights, a LoHa / LoKr one is no low-rank product."""
    if variants := sorted({NAMES[kind(lo)] for loras, _ in weighted for lo in loras.values()} - {"LoRA"}):
        raise AdaptError(f"merge sums plain LoRAs into a LoRA file, not {'/'.join(variants)} ones (a DoRA change depends on "
                         "the base weights, a LoHa/LoKr one is no low-rank product); `merge --into-model` fuses them")
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
