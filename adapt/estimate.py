"""Before a run: how much memory its peak will take and how long a step will last, from the model
folder's safetensors headers (shapes only; no weight is read) and a few calibrated constants.

The model of a training step (benchmarks/estimate.py measures it against real runs):
- memory = weights (frozen ones in the precision's dtype, trainable ones fp32) + their gradients
  and optimizer state + activations. Activations are `ACT_BYTES[kind]` bytes per unit of "activation
  volume": the sum over the UNet's weight layers of (output channels x positions at that layer's
  resolution), per image; gradient checkpointing keeps `CKPT_FRACTION` of them. The VAE and text
  encoder are in memory while the caches fill and released after, so the peak is the larger phase.
- time = the step's multiply-adds (every weight layer's MACs per position x its positions, plus
  attention's n^2 d) x `PASSES[kind]` (forward + backward), divided by a throughput per device and
  dtype, plus a fixed overhead. Throughput was calibrated on this project's CPUs; GPU figures are
  spec-sheet throughput at an assumed efficiency and are labelled uncalibrated.

Light: json and struct only, so `--dry-run` answers without importing torch for this part.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import AdaptError

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I8": 1, "U8": 1, "BOOL": 1}
PRECISION_BYTES = {"no": 4, "fp16": 2, "bf16": 2}
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw8bit": 2, "prodigy": 16, "schedule-free-adamw": 8}  # per trainable param
# Calibrated by benchmarks/estimate.py on 2 CPU cores (see README "Before a run").
ACT_BYTES = {"lora": 23.0, "full": 24.0, "embedding": 23.0,    # bytes per unit of activation volume at fp32
             "pivotal": 23.0}                                   # LoRA + embedding: LoRA's (not measured on its own)
CKPT_FRACTION = 0.35
MEMORY_OVERHEAD = 40 * 2**20                                    # allocator, buffers, autograd graph
PASSES = {"lora": 2.0, "full": 3.0, "embedding": 2.0, "pivotal": 2.0}  # forward (1) + backward to inputs (1) + to weights (1)
CPU_MACS_PER_S = {"no": 60e9, "bf16": 80e9, "fp16": 60e9}  # bf16: from the 4.9 -> 3.6 s (not measured here)
OVERHEAD_S = 0.02
# Dense fp16/bf16 tensor throughput (MAC/s = FLOP/s / 2) by GPU name, at an assumed 35% efficiency.
GPU_MACS_PER_S = {"H100": 495e12, "H200": 495e12, "A100": 156e12, "L4": 60e12, "A10": 62e12, "4090": 82e12,
                  "3090": 35e12, "T4": 32e12, "V100": 56e12}
GPU_EFFICIENCY = 0.35
TEXT_TOKENS = 77


@dataclass
class Estimate:
    peak_bytes: int
    seconds_per_step: float
    calibrated: bool            # False: a GPU figure from spec sheets, not from a measured run
    parts: dict[str, int]       # bytes: weights, gradients, optimizer, activations, encoders (while caching)


def read_header(path: Path) -> dict[str, tuple[list[int], str]]:
    """{tensor name: (shape, dtype)} of a .safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        size = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(size))
    return {k: (v["shape"], v["dtype"]) for k, v in header.items() if k != "__metadata__"}


def component_tensors(model: Path, component: str) -> dict[str, tuple[list[int], str]]:
    files = sorted((Path(model) / component).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{Path(model) / component} has no .safetensors weights to estimate from")
    out: dict[str, tuple[list[int], str]] = {}
    for f in files:
        out.update(read_header(f))
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _bytes(tensors: dict) -> int:
    return sum(_numel(s) * DTYPE_BYTES.get(d, 4) for s, d in tensors.values())


def _level(name: str, levels: int) -> int:
    """Resolution level (0 = full latent size) a UNet weight works at, by its diffusers name."""
    m = re.match(r"(down|up)_blocks\.(\d+)\.", name)
    if name.startswith("mid_block"):
        return levels - 1
    if not m:
        return 0
    i = int(m.group(2))
    if m.group(1) == "down":
        return min(i + 1, levels - 1) if ".downsamplers." in name else i
    level = levels - 1 - i
    return max(level - 1, 0) if ".upsamplers." in name else level


def unet_volume(unet: dict, latent_hw: tuple[int, int], levels: int) -> tuple[float, float]:
    """(multiply-adds of one forward pass, activation volume) per image."""
    macs = volume = 0.0
    for name, (shape, _) in unet.items():
        if not name.endswith(".weight") or len(shape) < 2:
            continue
        level = _level(name, levels)
        positions = (latent_hw[0] >> level) * (latent_hw[1] >> level)
        if "time_emb" in name or "add_embedding" in name or "time_embedding" in name:
            positions = 1
        elif re.search(r"attn2\.to_[kv]\.", name):
            positions = TEXT_TOKENS
        macs += _numel(shape) * positions
        volume += shape[0] * positions
        if re.search(r"attn[12]\.to_q\.", name):  # attention itself: QK^T and AV
            keys = positions if "attn1" in name else TEXT_TOKENS
            macs += 2 * positions * keys * shape[0]
    return macs, volume


def trainable_count(unet: dict, kind: str, targets: list[str], rank: int, text: dict | None = None) -> int:
    """Parameters with gradients and optimizer state: the UNet (full), the LoRA factors of the targeted
    Linear layers (lora), or the text encoder's whole token-embedding matrix (embedding: textual
    inversion trains that tensor and restores the old rows after each step), or both (pivotal)."""
    if kind == "pivotal":
        return trainable_count(unet, "lora", targets, rank) + trainable_count(unet, "embedding", targets, rank, text)
    if kind == "full":
        return sum(_numel(s) for s, _ in unet.values())
    if kind == "embedding":
        return sum(_numel(s) for n, (s, _) in (text or {}).items() if n.endswith("token_embedding.weight"))
    pattern = re.compile(r"\.(" + "|".join(re.escape(t) for t in targets) + r")\.weight$")
    return sum(rank * (s[0] + s[1]) for n, (s, _) in unet.items() if pattern.search(n) and len(s) == 2)


def throughput(device: str, precision: str, gpu_name: str = "") -> tuple[float, bool]:
    """(multiply-adds per second, calibrated?) for the device."""
    if device == "cpu":
        return CPU_MACS_PER_S.get(precision, CPU_MACS_PER_S["no"]), True
    peak = next((v for k, v in GPU_MACS_PER_S.items() if k in gpu_name), 30e12)
    if precision == "no":
        peak /= 8  # fp32 without tensor cores (TF32 would be faster; not assumed)
    return peak * GPU_EFFICIENCY, False


# --fused-backward auto: on from this many trainable parameters (a full UNet: SD 1.5's has 860M, 3.2 GiB of fp32
# gradients); a LoRA's gradients are megabytes, and the bundled base's full UNet (11M) 44 MB.
FUSED_BACKWARD_MIN_PARAMS = 100_000_000


def choose_fused_backward(cfg, n_train: int, n_proc: int, precision: str | None = None) -> tuple[bool, str | None]:
    """Whether a run (`cfg`: its TrainConfig; `precision` if auto was settled apart from it) steps each weight inside
    backward (optim.StepInBackward), and why (None: off as asked, or auto for a small run: nothing to say). Not where
    a step needs all gradients at once: Prodigy's and schedule-free's step sizes, fp16's loss scaling (unscale, then
    skip the whole step on an inf), data-parallel averaging, gradient accumulation (every gradient is kept until the
    last micro-batch anyway). --fused-backward on with one of those is an error; auto is then off."""
    conflicts = [why for bad, why in (
        (cfg.optimizer not in ("adamw", "adamw8bit"), f"--optimizer {cfg.optimizer} steps all weights together"),
        ((precision or cfg.mixed_precision) == "fp16", "fp16's loss scaling checks every gradient before a step"),
        (n_proc > 1, "data-parallel processes average the gradients after backward"),
        (cfg.grad_accum > 1, "gradient accumulation keeps every gradient until the last micro-batch"),
    ) if bad]
    if cfg.fused_backward == "on" and conflicts:
        raise AdaptError(f"--fused-backward on cannot work here: {conflicts[0]}; use --fused-backward off")
    if cfg.fused_backward == "off" or (cfg.fused_backward == "auto" and n_train < FUSED_BACKWARD_MIN_PARAMS):
        return False, None
    if conflicts:
        return False, conflicts[0]
    return True, (f"{n_train / 1e6:.0f}M trainable parameters: each weight steps as soon as its gradient is complete, "
                  f"which is then freed, so the {4 * n_train / 2**30:.1f} GiB of gradients are never held at once"
                  + ("; gradient clipping is per weight tensor" if cfg.max_grad_norm > 0 else ""))


def estimate(model: Path, *, kind: str, resolution: int, batch: int, precision: str = "no", optimizer: str = "adamw",
             targets: tuple[str, ...] = ("to_q", "to_k"), rank: int = 4, checkpointing: bool = False,
             device: str = "cpu", gpu_name: str = "", prior: bool = False, keep_encoders: bool = False,
             ema: bool = False, fused: Callable[[int], bool] | None = None) -> Estimate:
    """Peak memory and time per step of training `model` this way. `kind`: lora | full | embedding | pivotal;
    `prior`: prior preservation doubles the images per step; `keep_encoders`: the VAE and text
    encoders stay loaded while training (no cache, validation renders); `ema`: a moving average of
    the trainable weights on the device (one more fp32 copy); `fused(n_train)`: whether the run steps in backward
    (choose_fused_backward), so that at most one weight's gradient (the largest) is held."""
    model = Path(model)
    unet = component_tensors(model, "unet")
    config = json.loads((model / "unet" / "config.json").read_text())
    vae_config = json.loads((model / "vae" / "config.json").read_text())
    factor = 2 ** (len(vae_config.get("block_out_channels", [1, 1, 1, 1])) - 1)
    levels = len(config["block_out_channels"])
    latent = (resolution // factor, resolution // factor)
    images = batch * (2 if prior else 1)
    macs, volume = unet_volume(unet, latent, levels)
    text = component_tensors(model, "text_encoder") if kind in ("embedding", "pivotal") else None
    n_train = trainable_count(unet, kind, list(targets), rank, text)
    keep_encoders = keep_encoders or kind in ("embedding", "pivotal")  # its text encoder runs every step
    frozen_bytes = sum(_numel(s) for s, _ in unet.values()) * PRECISION_BYTES[precision] if kind != "full" else 0
    act = ACT_BYTES[kind] * volume * images * (PRECISION_BYTES[precision] / 4 if precision != "no" else 1)
    parts = {
        "weights": int(frozen_bytes + 4 * n_train),
        "gradients": int(4 * (min(n_train, max(_numel(s) for s, _ in unet.values())) if fused and fused(n_train) else n_train)),
        "optimizer": int((OPTIMIZER_STATE_BYTES.get(optimizer, 8) + (4 if ema else 0)) * n_train),
        "activations": int(act * (CKPT_FRACTION if checkpointing else 1.0)),
        "encoders": sum(_bytes(component_tensors(model, c)) for c in ("vae", "text_encoder", "text_encoder_2")
                        if (model / c).is_dir()),
    }
    training = parts["weights"] + parts["gradients"] + parts["optimizer"] + parts["activations"] + MEMORY_OVERHEAD
    training += parts["encoders"] if keep_encoders else 0
    caching = parts["weights"] + parts["encoders"] + MEMORY_OVERHEAD
    rate, calibrated = throughput(device, precision, gpu_name)
    seconds = OVERHEAD_S + macs * images * PASSES[kind] * (1.3 if checkpointing else 1.0) / rate
    return Estimate(max(training, caching), seconds, calibrated, parts)
