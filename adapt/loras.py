"""LoRA files in both layouts users meet, and arithmetic on them.

In memory a LoRA is a dict {"unet.<module path>" | "text_encoder.<module path>": Lora(down, up,
alpha)}; the module's update is (alpha / rank) * up @ down. Two file layouts are read and written:

* diffusers / peft: `unet.<path>.lora.down.weight` / `.lora.up.weight` (also `lora_A`/`lora_B`,
  `lora_linear_layer`), alpha in the `lora_adapter_metadata` peft config (or `.alpha` keys);
* kohya / A1111 / ComfyUI: `lora_unet_<path with _>.lora_down.weight`, `.lora_up.weight`,
  `.alpha`, `lora_te_` / `lora_te1_` / `lora_te2_` for the text encoders, `ss_*` metadata.

Kohya names replace every '.' by '_', so reading them back needs to know which underscores
belong to a name (`down_blocks`, `to_q`, ...): `from_kohya_name` joins the pieces greedily against
the identifiers of diffusers' UNet and transformers' CLIP modules; a test checks the round trip
on every module of the real SD 1.5 and SDXL architectures.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AdaptError
from .fileio import atomic_path
from .untrusted import check_lora_pair

FORMATS = ("diffusers", "kohya")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_TE1_PREFIX = "lora_te1_"  # kohya's name for the first text encoder when there are two
# Identifiers with underscores in diffusers UNet / transformers CLIP module paths.
_JOINED = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "linear_1", "linear_2", "add_embedding", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj",
    "final_layer_norm", "layer_norm1", "layer_norm2", "token_embedding", "position_embedding", "text_projection",
    "conv_act", "add_time_proj", "encoder_hid_proj", "class_embedding",
}, key=lambda s: -s.count("_"))


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


def to_kohya_name(key: str, two_text_encoders: bool = False) -> str:
    component, path = key.split(".", 1)
    prefix = SDXL_TE1_PREFIX if (component == "text_encoder" and two_text_encoders) else KOHYA_PREFIX[component]
    if component.startswith("text_encoder"):
        path = f"text_model.{path}"
    return prefix + path.replace(".", "_")


def from_kohya_name(name: str) -> str:
    """Inverse of to_kohya_name. Text-encoder paths are kept without transformers' optional
    `text_model.` prefix (as the installed CLIPTextModel names its modules)."""
    prefixes = [*KOHYA_PREFIX.items(), ("text_encoder", SDXL_TE1_PREFIX)]
    for component, prefix in prefixes:
        if name.startswith(prefix):
            break
    else:
        raise AdaptError(f"LoRA key {name!r} is neither diffusers nor kohya (lora_unet_/lora_te_) layout")
    pieces, rest = [], name[len(prefix):]
    while rest:
        for ident in _JOINED:
            if rest == ident or rest.startswith(ident + "_"):
                pieces.append(ident)
                rest = rest[len(ident) + 1:]
                break
        else:
            head, _, rest = rest.partition("_")
            pieces.append(head)
    if component.startswith("text_encoder") and pieces[:1] == ["text_model"]:
        pieces = pieces[1:]
    return f"{component}.{'.'.join(pieces)}"


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


def read_lora(path: str | Path, allow_pickle: bool = False) -> tuple[dict[str, Lora], dict]:
    """(modules, metadata) of a diffusers/peft or kohya LoRA file (safetensors; pickle only with allow_pickle)."""
    from .formats import read_safetensors

    tensors, meta = read_safetensors(path, "LoRA", allow_pickle)
    return parse_lora(tensors, meta, path), meta


def parse_lora(tensors: dict, meta: dict, path: str | Path) -> dict[str, Lora]:
    """The tensors of a LoRA file (either layout) as {component.module_path: Lora}; `path` names
    the file in errors."""
    if not tensors:
        raise AdaptError(f"{path} holds no tensors; pass a LoRA file")
    parts: dict[str, dict] = {}
    if is_kohya(tensors):
        for k, v in tensors.items():
            if k.startswith("lora_te") and not k.startswith(("lora_te_", "lora_te1_", "lora_te2_")):
                raise AdaptError(f"{path}: unsupported kohya key {k!r}")
            name, _, kind = k.partition(".")
            slot = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}.get(kind)
            if slot is None:
                raise AdaptError(f"{path}: unsupported kohya key {k!r} (only plain LoRA: lora_down/lora_up/alpha)")
            parts.setdefault(from_kohya_name(name), {})[slot] = v
    else:
        for k, v in tensors.items():
            if k.endswith(".alpha"):
                parts.setdefault(k[:-len(".alpha")], {})["alpha"] = v
                continue
            m = _DIFFUSERS_KEY.match(k)
            if not m:
                raise AdaptError(f"{path}: unrecognised LoRA key {k!r}; expected diffusers (unet.<path>.lora.down.weight) "
                                 "or kohya (lora_unet_<path>.lora_down.weight) layout")
            slot = "down" if m.group(3).endswith(("down", "A")) else "up"
            module_path = m.group(2).removeprefix("text_model.") if m.group(1) != "unet" else m.group(2)
            parts.setdefault(f"{m.group(1)}.{module_path}", {})[slot] = v
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


def _uniform(loras: dict[str, Lora]) -> dict[str, Lora]:
    """Same update with one rank and one alpha for the whole file, the shape every loader
    understands without per-module patterns: kept as it is when that already holds, else
    alpha = rank and ranks zero-padded (zero rows add nothing to up @ down)."""
    import torch

    if len({(lo.rank, lo.alpha) for lo in loras.values()}) == 1:
        return loras
    rank = max(lo.rank for lo in loras.values())
    out = {}
    for k, lo in loras.items():
        up = lo.up * lo.scale
        down = lo.down
        if lo.rank < rank:
            pad = rank - lo.rank
            down = torch.cat([down, down.new_zeros(pad, *down.shape[1:])])
            up = torch.cat([up, up.new_zeros(up.shape[0], pad, *up.shape[2:])], dim=1)
        out[k] = Lora(down, up, float(rank))
    return out


def write_lora(path: str | Path, loras: dict[str, Lora], fmt: str = "diffusers", metadata: dict | None = None) -> Path:
    """Write `loras` as one safetensors file in `fmt` (diffusers or kohya), atomically."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise AdaptError(f"unknown LoRA format {fmt!r}; choose one of: {', '.join(FORMATS)}")
    if not loras:
        raise AdaptError("nothing to write: the LoRA has no modules")
    meta = {"format": "pt", **{k: str(v) for k, v in (metadata or {}).items()}}
    tensors = {}
    if fmt == "kohya":
        two = any(k.startswith("text_encoder_2.") for k in loras)
        for key, lo in sorted(loras.items()):
            name = to_kohya_name(key, two)
            tensors[f"{name}.lora_down.weight"] = lo.down.contiguous()
            tensors[f"{name}.lora_up.weight"] = lo.up.contiguous()
            import torch

            tensors[f"{name}.alpha"] = torch.tensor(float(lo.alpha))
        ranks = {lo.rank for lo in loras.values()}
        alphas = {lo.alpha for lo in loras.values()}
        meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                     "ss_network_alpha": str(max(alphas))})
    else:
        loras = _uniform(loras)
        rank, alpha = next(iter(loras.values())).rank, next(iter(loras.values())).alpha
        adapter_meta = {}
        for key, lo in sorted(loras.items()):
            component, module_path = key.split(".", 1)
            # diffusers' spelling: `.lora.down` for the UNet, `.lora_linear_layer.down` for text encoders
            infix = "lora" if component == "unet" else "lora_linear_layer"
            tensors[f"{key}.{infix}.down.weight"] = lo.down.contiguous()
            tensors[f"{key}.{infix}.up.weight"] = lo.up.contiguous()
            adapter_meta.setdefault(f"{component}.r", rank)
            adapter_meta.setdefault(f"{component}.lora_alpha", alpha)
            targets = adapter_meta.setdefault(f"{component}.target_modules", [])
            targets.append(module_path)
        meta["lora_adapter_metadata"] = json.dumps(adapter_meta, sort_keys=True)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def combine(weighted: list[tuple[dict[str, Lora], float]]) -> dict[str, Lora]:
    """One LoRA that is exactly sum_i w_i * (alpha_i / r_i) * B_i A_i: ranks concatenated, each
    file's weight and scale folded into its up matrix (alpha = total rank, so scale 1)."""
    import torch

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
    import torch

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
