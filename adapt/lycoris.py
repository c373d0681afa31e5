"""The LoRA variants beyond a plain low-rank product: their maths and their tensor names.

* DoRA (peft's `use_dora`): a LoRA plus a learned magnitude m per output row; the module's weight
  becomes m / ||W + dW||_row * (W + dW), dW the LoRA's (alpha / r) * up @ down. Its change
  depends on the base weight W. In memory a `loras.Lora` with `magnitude`; in diffusers files
  `<module>.lora_magnitude_vector.weight`, as diffusers' load_lora_weights reads it.
* LoHa (LyCORIS, peft's LoHaConfig): dW = (alpha / r) * (w1_a @ w1_b) * (w2_a @ w2_b), elementwise.
* LoKr (LyCORIS, peft's LoKrConfig): dW = scale * kron(W1, W2), each factor whole (`lokr_w1`) or a
  low-rank product (`lokr_w1_a @ lokr_w1_b`).

LoHa and LoKr are `Lycoris` modules named as LyCORIS and kohya's trainer write them
(`lora_unet_<path>.hada_w1_a`, ..., `.alpha`), the names ComfyUI and A1111/Forge look up. Their
scale is the one those readers apply (ComfyUI comfy/weight_adapter/loha.py and lokr.py, A1111
extensions-builtin/Lora/network_hada.py and network_lokr.py): LoHa alpha / r (r: w1_b's rows);
LoKr alpha / r when a factor is a product (r: its inner size, w2's when both are), else 1, and no
alpha at all means 1. peft's LoKr scales by alpha / r even when both factors are whole, so that
scale is folded into W1 when such a module is written (`from_peft`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import AdaptError
from .untrusted import check_finite

HADA_SLOTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
KRON_SLOTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
SLOTS = HADA_SLOTS + KRON_SLOTS  # tensor names after `<module>.` in LyCORIS/kohya files and peft state dicts
MAGNITUDE = "lora_magnitude_vector"  # peft's (and diffusers') name of DoRA's magnitude
NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}


@dataclass
class Lycoris:
    algo: str                # "loha" | "lokr"
    parts: dict              # slot -> tensor (float32, CPU)
    alpha: float | None      # None: scale 1

    @property
    def rank(self) -> int:
        p = self.parts
        if self.algo == "loha":
            return int(p["hada_w1_b"].shape[0])
        inner = p.get("lokr_w2_b", p.get("lokr_w1_b"))
        return int(inner.shape[0]) if inner is not None else int(max(p["lokr_w2"].shape[:2]))

    @property
    def scale(self) -> float:
        if self.alpha is None or (self.algo == "lokr" and not {"lokr_w1_b", "lokr_w2_b"} & self.parts.keys()):
            return 1.0
        return self.alpha / self.rank

    def delta(self, shape=None):
        """The change to the module's weight at weight 1, shaped `shape` (default: 2-D [out, in])."""
        p = {k: v.float() for k, v in self.parts.items()}
        if self.algo == "loha":
            d = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
        else:
            w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
            w2 = p["lokr_w2"] if "lokr_w2" in p else p["lokr_w2_a"] @ p["lokr_w2_b"]
            d = torch.kron(w1[:, :, None, None] if w2.ndim == 4 else w1, w2)
        d = d * self.scale
        return d if shape is None else d.reshape(shape)

    def weight_delta(self, base):
        """The change to the weight `base` at weight 1 (LoHa and LoKr do not depend on it)."""
        d = self.delta()
        if d.numel() != base.numel():
            raise ValueError(f"a {self.algo} update of shape {list(d.shape)} for a weight of shape {list(base.shape)}")
        return d.reshape(base.shape).to(base.device)


def dora_delta(base, update, magnitude):
    """DoRA's change to the weight `base` (any shape, output rows first) given the LoRA update dW:
    m / ||W + dW||_row * (W + dW) - W, peft's normalisation (the norm of each output row)."""
    w = base.float() + update.to(base.device).float()
    norm = w.flatten(1).norm(dim=1)
    return w * (magnitude.to(w.device).float() / norm).view(-1, *[1] * (w.ndim - 1)) - base.float()


def checked_magnitude(key: str, magnitude, rows: int, path):
    """A DoRA magnitude read from the file `path`: one finite entry per output row, as a flat float tensor."""
    if magnitude.numel() != rows:
        raise AdaptError(f"LoRA file {path}: module {key} has a DoRA magnitude of {magnitude.numel()} entries for "
                         f"{rows} output rows; the file is broken: use another file")
    check_finite({f"{key} magnitude": magnitude}, path, "LoRA")
    return magnitude.float().flatten()


def kind(adapter) -> str:
    """lora, dora, loha or lokr: what an in-memory module (loras.Lora or Lycoris) is."""
    if isinstance(adapter, Lycoris):
        return adapter.algo
    return "lora" if getattr(adapter, "magnitude", None) is None else "dora"


def from_parts(key: str, parts: dict, path) -> Lycoris:
    """A LyCORIS module from a file's tensors {slot or "alpha": tensor}; errors name the file."""
    algo = "loha" if any(s in parts for s in HADA_SLOTS) else "lokr"
    if algo == "loha":
        missing = [s for s in HADA_SLOTS if s not in parts]
    else:
        missing = [f"{f} (or {f}_a and {f}_b)" for f in ("lokr_w1", "lokr_w2")
                   if f not in parts and not {f"{f}_a", f"{f}_b"} <= parts.keys()]
    others = sorted(k for k in parts if k not in (*(HADA_SLOTS if algo == "loha" else KRON_SLOTS), "alpha"))
    if missing or others:
        raise AdaptError(f"LoRA file {path}: {algo} module {key} {'lacks ' + ', '.join(missing) if missing else 'also has ' + ', '.join(others)}; "
                         "the file is broken: use another file")
    tensors = {k: v.float() for k, v in parts.items() if k != "alpha"}
    check_finite({f"{key}.{k}": v for k, v in tensors.items()}, path, "LoRA")
    module = Lycoris(algo, tensors, float(parts["alpha"]) if "alpha" in parts else None)
    try:
        module.delta()
    except RuntimeError:
        shapes = ", ".join(f"{k} {list(v.shape)}" for k, v in tensors.items())
        raise AdaptError(f"LoRA file {path}: the {algo} tensors of module {key} do not fit together ({shapes}); "
                         "the file is broken: use another file") from None
    return module


def from_peft(algo: str, parts: dict, alpha: float, rank: int) -> Lycoris:
    """A trained peft LoHa / LoKr module's tensors {slot: tensor} as the LyCORIS module that readers
    apply with peft's scale alpha / rank."""
    parts = {k: v.detach().float().cpu() for k, v in parts.items()}
    if algo == "lokr" and not {"lokr_w1_b", "lokr_w2_b"} & parts.keys():
        parts["lokr_w1"] = parts["lokr_w1"] * (alpha / rank)  # readers apply no alpha to whole factors
        return Lycoris(algo, parts, None)
    return Lycoris(algo, parts, float(alpha))
