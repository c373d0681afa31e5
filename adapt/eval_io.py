"""`adapt eval`'s files and text: the prompts file (JSONL), reference images, the terminal table.
numpy/PIL only, like evaluate.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from PIL import Image

from .errors import AdaptError
from .metrics import _as_rgb


# --------------------------------------------------------------------------------------------
# Prompts file
# --------------------------------------------------------------------------------------------


def normalise_item(raw: Any, index: int, base_seed: int, where: str) -> dict:
    if not isinstance(raw, dict):
        raise AdaptError(f"{where}: expected a JSON object like {{\"caption\": \"...\"}}, got {type(raw).__name__}")
    caption = raw.get("caption", raw.get("prompt"))
    if not isinstance(caption, str) or not caption.strip():
        raise AdaptError(f"{where}: missing \"caption\" (or \"prompt\"): every line needs a non-empty text caption")
    item = dict(raw)
    item.pop("prompt", None)
    item["caption"] = caption
    file = raw.get("file")
    if file is not None and (not isinstance(file, str) or not file):
        raise AdaptError(f"{where}: \"file\" must be a reference image file name, got {file!r}")
    seed = raw.get("seed")
    if seed is None:
        seed = base_seed + index
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise AdaptError(f"{where}: \"seed\" must be an integer, got {seed!r}")
    item["seed"] = int(seed)
    return item


def read_prompts(path: str | os.PathLike, base_seed: int = 0) -> list[dict]:
    """Read a prompts JSONL file: one object per line.

    Each line needs "caption" (or "prompt", stored as "caption"); optional "file" (reference image
    file name, relative to the refs directory) and "seed".  A missing seed becomes
    base_seed + index, where index is the 0-based position of the prompt among the non-blank lines
    (so blank lines do not shift seeds).  Other keys are kept.  Raises AdaptError for a missing
    file, bad JSON (the message names the line number), a missing caption or a bad seed/file.
    """
    path = Path(path)
    if not path.is_file():
        raise AdaptError(f"prompts file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise AdaptError(f"cannot read prompts file {path}: {e}") from e
    items: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as e:
            raise AdaptError(f"{where}: bad JSON on line {lineno}: {e.msg}") from e
        items.append(normalise_item(raw, len(items), base_seed, where))
    if not items:
        raise AdaptError(f"prompts file {path} has no prompts")
    return items



def load_refs(refs_dir: Path, files: list[str], what: str) -> list[Image.Image]:
    if not refs_dir.is_dir():
        raise AdaptError(f"{what} directory not found: {refs_dir}")
    out = []
    for name in files:
        p = refs_dir / name
        if not p.is_file():
            raise AdaptError(f"{what} image {name!r} (named in the prompts) not found in {refs_dir}")
        out.append(_as_rgb(p))
    return out



# --------------------------------------------------------------------------------------------
# Terminal output
# --------------------------------------------------------------------------------------------


def format_table(metrics: dict) -> str:
    """A short plain-text table: metric, value, chance level (where one makes sense)."""
    rows: list[tuple[str, str, str]] = []
    fid = metrics.get("fidelity")
    if fid:
        rows.append((f"fidelity top-1 ({fid['n']} imgs, {fid['m']} refs)", f"{fid['top1']:.3f}", f"{fid['chance_top1']:.3f}"))
        rows.append(("fidelity top-5", f"{fid['top5']:.3f}", f"{fid['chance_top5']:.3f}"))
        rows.append(("fidelity mean rank (lower=better)", f"{fid['mean_rank']:.2f}", f"{fid['chance_mean_rank']:.2f}"))
    sty = metrics.get("style")
    if sty:
        rows.append(("style: closer to A than B", f"{sty['a_rate']:.3f}", f"{sty['chance']:.3f}"))
        rows.append(("style: mean distance to A / B", f"{sty['mean_dist_a']:.2f} / {sty['mean_dist_b']:.2f}", "-"))
    sts = metrics.get("styles")
    if sts:
        if sts["accuracy"] is not None:
            rows.append((f"style asked for = nearest of {len(sts['styles'])}", f"{sts['accuracy']:.3f}", f"{sts['chance']:.3f}"))
        rows.append(("distinct styles per prompt (across seeds)", f"{sts['distinct_per_caption']:.2f}", "-"))
    div = metrics.get("diversity")
    if div and div["mean"] is not None:
        rows.append((f"diversity across seeds ({div['groups']} prompts, mean L2)", f"{div['mean']:.3f}", "-"))
    if metrics.get("drift") is not None:
        rows.append(("drift vs compare model (mean L2)", f"{metrics['drift']:.3f}", "-"))
    sd = metrics.get("set_distance")
    if sd:
        rows.append((f"distance to set ({sd['set_images']} imgs, lower=closer)", f"{sd['model']:.3f}", "-"))
        if sd.get("compare") is not None:
            rows.append(("distance to set, compare model", f"{sd['compare']:.3f}", "-"))
    if "n" in metrics:
        rows.append(("images generated", str(metrics["n"]), "-"))
    header = ("metric", "value", "chance")
    w0 = max(len(header[0]), *(len(r[0]) for r in rows)) if rows else len(header[0])
    w1 = max(len(header[1]), *(len(r[1]) for r in rows)) if rows else len(header[1])
    lines = [f"{header[0]:<{w0}}  {header[1]:>{w1}}  {header[2]}", f"{'-' * w0}  {'-' * w1}  ------"]
    lines += [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    for note in metrics.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)
