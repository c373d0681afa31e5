"""The bodies of `adapt merge` and `adapt convert`: LoRA files combined, reduced in rank,
rewritten in another layout, or fused into a model folder. Arguments are checked by the caller."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .formats import save_fused_pipeline
from .infer import load_pipeline
from .lora_names import is_sdxl
from .loras import combine, read_lora, reduce_rank, write_lora
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
    log.info("wrote %s (%s layout, rank %d)", output, fmt, next(iter(merged.values())).rank)
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
    keep = {k: v for k, v in meta.items() if k.startswith(("adapt.", "ss_")) and k not in ("ss_network_dim", "ss_network_alpha")}
    write_lora(output, loras, to, keep)
    log.info("wrote %s (%s layout, %d modules)", output, to, len(loras))
