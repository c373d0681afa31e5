"""The bodies of `adapt merge`, `adapt convert` and `adapt resize`: LoRA files combined, reduced
in rank, rewritten in another layout, or fused into a model folder. Arguments are checked by the
caller. (`adapt extract`: extract.py.)"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import torch

from .errors import AdaptError
from .fileio import read_safetensors
from .formats import save_fused_pipeline, write_lora_outputs
from .infer import load_pipeline
from .lora_names import is_sdxl
from .loras import combine, is_kohya, parse_lora, read_lora, write_lora
from .lowrank import lora_spectrum, pick_rank, reduce_rank, relative_error, worst_modules
from .models import resolve_model

log = logging.getLogger("adapt")


def _sources(loras: list[tuple[str, float]]) -> list[dict]:
    return [{"file": p, "weight": w} for p, w in loras]


def merge_to_file(loras: list[tuple[str, float]], output: Path, fmt: str, rank: int | None = None,
                  allow_pickle: bool = False, lenient: bool = False) -> float | None:
    """ONE LoRA file: sum_i w_i * (alpha_i/r_i) * B_i A_i (ranks concatenated), or its rank-`rank`
    SVD approximation; returns that approximation's relative error (None without `rank`)."""
    read = [(read_lora(p, allow_pickle, lenient), w) for p, w in loras]
    merged, err = combine([(modules, w) for (modules, _), w in read]), None
    if rank is not None:
        merged, err = reduce_rank(merged, rank)
    meta = {"adapt.merge": json.dumps({"loras": _sources(loras), "rank": rank})}
    write_lora(output, merged, fmt, meta, sdxl=any(is_sdxl(modules, m) for (modules, m), _ in read))
    log.info("wrote %s (%s layout, rank %d)", output, fmt, max(lo.rank for lo in merged.values()))
    return err


def merge_into_model(loras: list[tuple[str, float]], model: str | None, into_model: Path, allow_pickle: bool = False,
                     lenient: bool = False) -> None:
    """A diffusers model folder with the LoRAs fused into its weights."""
    pipe = load_pipeline(model, device="cpu", dtype=torch.float32, loras=loras, fuse=True, allow_pickle=allow_pickle,
                         lenient=lenient)
    save_fused_pipeline(pipe, resolve_model(model), into_model, {"method": "merge", "base_model": str(model or "bundled"),
                                                                 "loras": _sources(loras)})
    log.info("wrote model folder %s with %d LoRA(s) fused", into_model, len(loras))


def convert(file: Path, to: str, output: Path, allow_pickle: bool = False, lenient: bool = False) -> None:
    """Rewrite a LoRA file in layout `to`, keeping adapt's and kohya's descriptive metadata."""
    loras, meta = read_lora(file, allow_pickle, lenient)
    write_lora(output, loras, to, _descriptive(meta))
    log.info("wrote %s (%s layout, %d modules)", output, to, len(loras))


def _descriptive(meta: dict) -> dict:
    """adapt's and kohya's metadata that describe a LoRA, not its layout or rank (those are rewritten)."""
    return {k: v for k, v in meta.items() if k.startswith(("adapt.", "ss_")) and k not in ("ss_network_dim", "ss_network_alpha")}


def _size(path: Path) -> str:
    return f"{path.stat().st_size / 1024:.1f} KiB"


def resize(file: Path, output: Path, fmt: str | None, rank: int | None, energy: float | None,
           allow_pickle: bool = False, lenient: bool = False) -> list[str]:
    """Each module's update at rank `rank`, or at the smallest rank holding `energy` of its sum(s^2)
    (capped by `rank` when both), by SVD; modules whose update is zero are left out. A file
    --output keeps the input's layout unless `fmt` says otherwise. Returns the report lines."""
    tensors, meta = read_safetensors(file, "LoRA", allow_pickle)
    loras = parse_lora(tensors, meta, file, lenient)
    spectra = {k: sp for k, sp in ((k, lora_spectrum(lo)) for k, lo in loras.items()) if sp.energy > 0}
    if not spectra:
        raise AdaptError(f"every module of {file} has a zero update; nothing to resize")
    ranks = {k: pick_rank(sp, rank, energy) for k, sp in spectra.items()}
    err = relative_error(spectra, ranks)
    if fmt is None and Path(output).suffix == ".safetensors":
        fmt = "kohya" if is_kohya(tensors) else "diffusers"
    record = {"source": str(file), "rank": rank, "energy": energy, "relative_error": err}
    written = write_lora_outputs(output, {k: sp.lora(ranks[k]) for k, sp in spectra.items()}, fmt,
                                 {**_descriptive(meta), "adapt.resize": json.dumps(record, sort_keys=True)},
                                 sdxl=is_sdxl(loras, meta))
    old, new = sorted({lo.rank for lo in loras.values()}), sorted(ranks.values())
    summary = f"ranks {_span(old)} -> {_span(new)}" + (f" (median {statistics.median(new):g})" if len(set(new)) > 1 else "")
    summary += f" over {len(spectra)} modules"
    if len(loras) > len(spectra):
        summary += f"; {len(loras) - len(spectra)} with a zero update left out"
    return [summary, f"relative error ||dW - dW_r|| / ||dW|| = {err:.6f}", "largest relative errors:",
            *worst_modules(spectra, ranks), *(f"size {_size(Path(file))} -> {_size(path)}: {path}" for path in written)]


def _span(values: list[int]) -> str:
    return str(values[0]) if values[0] == values[-1] else f"{values[0]}..{values[-1]}"
