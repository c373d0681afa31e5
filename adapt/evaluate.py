"""`adapt eval`: what did fine-tuning actually learn?

Image generation is not done here: `run_eval` takes a `generate(prompts, seeds) -> [PIL.Image]`
callable, so this module is numpy/PIL only and can be tested without a model (no torch import).
The metrics and their fixed feature space are in `adapt.metrics`.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from .errors import AdaptError
from .fileio import write_json
from .images import make_grid, save_image, to_rgb
from .metrics import (FEATURE_SIZE, _as_rgb, _paired_distances, distance_to_set, diversity, features, nearest_style,
                      retrieval, style)

GenerateFn = Callable[[list, list], list]


# --------------------------------------------------------------------------------------------
# Prompts file
# --------------------------------------------------------------------------------------------


def _normalise_item(raw: Any, index: int, base_seed: int, where: str) -> dict:
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
        items.append(_normalise_item(raw, len(items), base_seed, where))
    if not items:
        raise AdaptError(f"prompts file {path} has no prompts")
    return items


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are a nicety, not a requirement
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="batch")


def _generate_all(generate: GenerateFn, captions: list, seeds: list, batch_size: int, progress: bool, desc: str) -> list:
    starts = range(0, len(captions), batch_size)
    images: list = []
    for start in _progress(starts, len(starts), progress, desc):
        prompts = captions[start : start + batch_size]
        batch = list(generate(list(prompts), list(seeds[start : start + batch_size])))
        if len(batch) != len(prompts):
            raise RuntimeError(f"generate returned {len(batch)} images for {len(prompts)} prompts")
        for img in batch:
            if not isinstance(img, Image.Image):
                raise TypeError(f"generate must return PIL images, got {type(img).__name__}")
        images.extend(to_rgb(img) for img in batch)
    return images


def _load_refs(refs_dir: Path, files: list[str], what: str) -> list[Image.Image]:
    if not refs_dir.is_dir():
        raise AdaptError(f"{what} directory not found: {refs_dir}")
    out = []
    for name in files:
        p = refs_dir / name
        if not p.is_file():
            raise AdaptError(f"{what} image {name!r} (named in the prompts) not found in {refs_dir}")
        out.append(_as_rgb(p))
    return out


def run_eval(
    generate: GenerateFn,
    items: Sequence[dict],
    out_dir: str | os.PathLike,
    refs_dir: str | os.PathLike | None = None,
    refs_b_dir: str | os.PathLike | None = None,
    compare: GenerateFn | None = None,
    set_dir: str | os.PathLike | None = None,
    base_seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    style_dirs: Sequence[str | os.PathLike] = (),
) -> dict:
    """Generate one image per item, score it, write `eval.json` + `grid.png` into out_dir.

    generate(prompts: list[str], seeds: list[int]) -> list[PIL.Image] is called in batches of
    `batch_size`.  Items are dicts as from `read_prompts` ("caption"/"prompt", optional "file",
    "style" and "seed"; a missing seed becomes base_seed + index).

    - refs_dir: items with a "file" are scored by `retrieval` against ALL distinct reference files
      named by the items (loaded from refs_dir), target = the item's own file.
    - refs_b_dir (needs refs_dir): `style` with A = refs_dir/file, B = refs_b_dir/file.
    - style_dirs: several style folders with the same file names; each image with a "file" gets
      its nearest style (the folder whose drawing of that file is closest); items that name the
      "style" they asked for (a folder name) are scored for accuracy; per caption, the number of
      distinct styles across seeds.
    - compare: a second generate callable (e.g. the base model) run on the same prompts and seeds;
      reports `drift` between the two models' images.
    - set_dir: a folder of images (e.g. the training images); reports `distance_to_set` of the
      generated images (and of the compare model's, when given): did the model move toward them?

    Always reports "diversity": per caption with several seeds, the mean pairwise distance.
    Returns the metrics dict (the same content as eval.json) with "items" (per-item rows).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if refs_b_dir is not None and refs_dir is None:
        raise AdaptError("a style-B reference directory needs a style-A reference directory too (refs_dir)")
    items = [_normalise_item(raw, i, base_seed, f"item {i}") for i, raw in enumerate(items)]
    if not items:
        raise AdaptError("nothing to evaluate: no prompts")
    out_dir = Path(out_dir)
    captions, seeds = [it["caption"] for it in items], [it["seed"] for it in items]
    gen_images = _generate_all(generate, captions, seeds, batch_size, progress, "eval")
    gen_feats = features(gen_images)
    rows = [{"caption": it["caption"], "file": it.get("file"), "seed": it["seed"], "rank": None} for it in items]
    metrics: dict[str, Any] = {"n": len(items), "fidelity": None, "style": None, "styles": None, "drift": None,
                               "set_distance": None, "diversity": diversity(gen_feats, captions)}
    notes: list[str] = []
    ref_by_item = _fidelity(metrics, rows, notes, items, gen_feats, refs_dir, refs_b_dir)
    if style_dirs:
        metrics["styles"] = _styles(rows, items, gen_feats, [Path(d) for d in style_dirs])
    cmp_images = cmp_feats = None
    if compare is not None:
        cmp_images = _generate_all(compare, captions, seeds, batch_size, progress, "compare")
        cmp_feats = features(cmp_images)
        per_item = _paired_distances(gen_feats, cmp_feats, "model and compare features")
        metrics["drift"] = float(per_item.mean())
        for row, d in zip(rows, per_item):
            row["drift"] = float(d)
    if set_dir is not None:
        from .data import list_images

        set_feats = features(list_images(set_dir))
        metrics["set_distance"] = {
            "model": distance_to_set(gen_feats, set_feats),
            "compare": None if cmp_feats is None else distance_to_set(cmp_feats, set_feats),
            "set_images": int(set_feats.shape[0]),
        }
    metrics.update(items=rows, notes=notes, config={
        "refs_dir": None if refs_dir is None else str(refs_dir),
        "refs_b_dir": None if refs_b_dir is None else str(refs_b_dir),
        "style_dirs": [str(d) for d in style_dirs], "compare": compare is not None,
        "set_dir": None if set_dir is None else str(set_dir), "base_seed": base_seed, "batch_size": batch_size,
        "feature_space": f"RGB on white, box-resized to {FEATURE_SIZE}x{FEATURE_SIZE}, [0,1], L2",
    })
    metrics["grid_layout"] = _save_grid(gen_images, ref_by_item, cmp_images, out_dir / "grid.png")
    write_json(out_dir / "eval.json", metrics)
    return metrics


def _fidelity(metrics: dict, rows: list[dict], notes: list[str], items: list[dict], gen_feats: np.ndarray,
              refs_dir, refs_b_dir) -> list[Image.Image | None]:
    """Retrieval among the references the items name (and A-vs-B style); returns each item's reference."""
    n = len(items)
    ref_by_item: list[Image.Image | None] = [None] * n
    with_file = [i for i, it in enumerate(items) if it.get("file")]
    if refs_dir is not None and not with_file:
        notes.append("refs given but no prompt names a reference \"file\": fidelity not computed")
    if refs_dir is None or not with_file:
        return ref_by_item
    files = list(dict.fromkeys(items[i]["file"] for i in with_file))  # distinct, first-seen order
    refs_a = _load_refs(Path(refs_dir), files, "reference")
    index_of = {f: j for j, f in enumerate(files)}
    targets = [index_of[items[i]["file"]] for i in with_file]
    fid = retrieval(gen_feats[with_file], features(refs_a), targets)
    for k, i in enumerate(with_file):
        rows[i].update(rank=fid["ranks"][k], nearest=files[fid["nearest"][k]])
        ref_by_item[i] = refs_a[targets[k]]
    fid["references"] = files
    metrics["fidelity"] = fid
    if len(with_file) < n:
        notes.append(f"{n - len(with_file)} of {n} prompts have no reference \"file\": not in fidelity")
    if refs_b_dir is not None:
        refs_b = _load_refs(Path(refs_b_dir), files, "style-B reference")
        feats_a = features([refs_a[t] for t in targets])
        feats_b = features([refs_b[t] for t in targets])
        metrics["style"] = style(gen_feats[with_file], feats_a, feats_b)
        d_a = _paired_distances(gen_feats[with_file], feats_a, "gen and A")
        d_b = _paired_distances(gen_feats[with_file], feats_b, "gen and B")
        for k, i in enumerate(with_file):
            rows[i]["closer_to_a"] = bool(d_a[k] < d_b[k])
    return ref_by_item


def _styles(rows: list[dict], items: list[dict], gen_feats: np.ndarray, dirs: list[Path]) -> dict:
    """Nearest style per image among several style folders (only the files every folder has)."""
    names = [d.name for d in dirs]
    usable = [i for i, it in enumerate(items) if it.get("file") and all((d / it["file"]).is_file() for d in dirs)]
    if not usable:
        raise AdaptError("no prompt names a reference \"file\" that every --style-refs folder has")
    refs = {d.name: features([d / items[i]["file"] for i in usable]) for d in dirs}
    got = nearest_style(gen_feats[usable], refs)
    for i, s in zip(usable, got):
        rows[i]["nearest_style"] = s
    asked = [(items[i]["style"], s) for i, s in zip(usable, got) if items[i].get("style") in names]
    per_caption: dict[str, set[str]] = {}
    for i, s in zip(usable, got):
        per_caption.setdefault(items[i]["caption"], set()).add(s)
    return {"styles": names, "n": len(usable), "counts": {s: got.count(s) for s in names},
            "accuracy": sum(a == s for a, s in asked) / len(asked) if asked else None, "asked": len(asked),
            "distinct_per_caption": float(np.mean([len(v) for v in per_caption.values()])),
            "chance": 1.0 / len(names)}


def _save_grid(gen_images: list, ref_by_item: list, cmp_images: list | None, path: Path) -> list[str]:
    """[reference | generated | compare] per item when available."""
    size = gen_images[0].size
    blank = Image.new("RGB", size, (255, 255, 255))
    has_refs = any(r is not None for r in ref_by_item)
    per_item = 1 + int(has_refs) + int(cmp_images is not None)
    cells: list[Image.Image] = []
    for i, img in enumerate(gen_images):
        if has_refs:
            cells.append(blank if ref_by_item[i] is None else ref_by_item[i].resize(size, Image.BOX))
        cells.append(img)
        if cmp_images is not None:
            cells.append(cmp_images[i])
    save_image(make_grid(cells, cols=max(1, math.ceil(math.sqrt(len(gen_images)))) * per_item), path)
    return ["reference"] * has_refs + ["generated"] + ["compare"] * (cmp_images is not None)


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
