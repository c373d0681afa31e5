"""`adapt eval`: what did fine-tuning actually learn?

Image generation is not done here: `run_eval` takes a `generate(prompts, seeds) -> [PIL.Image]`
callable, so this module is numpy/PIL only and can be tested without a model (no torch import).
The metrics and their fixed feature space are in `adapt.metrics`; the prompts file, reference
images and the terminal table in `adapt.eval_io`. `evaluate_models` is the body of `adapt eval`:
it loads the pipelines (inside the function) and hands run_eval their renderers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from . import infer
from .checks import list_images
from .errors import AdaptError
from .eval_io import load_refs, normalise_item
from .fileio import write_json
from .images import make_grid, save_image, to_rgb
from .metrics import (FEATURE_SIZE, _paired_distances, distance_to_set, diversity, features, nearest_style,
                      retrieval, style)
from .schedulers import DEFAULT_SCHEDULER

GenerateFn = Callable[[list, list], list]


# --------------------------------------------------------------------------------------------
# Running an evaluation
# --------------------------------------------------------------------------------------------


def _progress(iterable, total: int, enabled: bool, desc: str):
    if not enabled:
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
    items = [normalise_item(raw, i, base_seed, f"item {i}") for i, raw in enumerate(items)]
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
    cmp_images, cmp_feats = _compare(metrics, rows, compare, captions, seeds, gen_feats, batch_size, progress)
    if set_dir is not None:
        metrics["set_distance"] = _set_distance(set_dir, gen_feats, cmp_feats)
    metrics.update(items=rows, notes=notes, config={
        "refs_dir": _str(refs_dir), "refs_b_dir": _str(refs_b_dir), "style_dirs": [str(d) for d in style_dirs],
        "compare": compare is not None, "set_dir": _str(set_dir), "base_seed": base_seed, "batch_size": batch_size,
        "feature_space": f"RGB on white, box-resized to {FEATURE_SIZE}x{FEATURE_SIZE}, [0,1], L2",
    })
    metrics["grid_layout"] = _save_grid(gen_images, ref_by_item, cmp_images, out_dir / "grid.png")
    write_json(out_dir / "eval.json", metrics)
    return metrics


def _str(path) -> str | None:
    return None if path is None else str(path)


def _set_distance(set_dir, gen_feats: np.ndarray, cmp_feats: np.ndarray | None) -> dict:
    """Did the model (and the compare model) move toward the images of set_dir?"""
    set_feats = features(list_images(set_dir, "--set"))
    return {"model": distance_to_set(gen_feats, set_feats),
            "compare": None if cmp_feats is None else distance_to_set(cmp_feats, set_feats),
            "set_images": int(set_feats.shape[0])}


def _compare(metrics: dict, rows: list[dict], compare, captions, seeds, gen_feats, batch_size: int, progress: bool):
    """The compare model on the same prompts and seeds: drift per item and overall; its images and features."""
    if compare is None:
        return None, None
    cmp_images = _generate_all(compare, captions, seeds, batch_size, progress, "compare")
    cmp_feats = features(cmp_images)
    per_item = _paired_distances(gen_feats, cmp_feats, "model and compare features")
    metrics["drift"] = float(per_item.mean())
    for row, d in zip(rows, per_item):
        row["drift"] = float(d)
    return cmp_images, cmp_feats


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
    refs_a = load_refs(Path(refs_dir), files, "reference")
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
        refs_b = load_refs(Path(refs_b_dir), files, "style-B reference")
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


def evaluate_models(items: list[dict], out: Path, *, model: str | None = None, loras=(), embeddings=(),
                    compare_model: str | None = None, compare_loras=(), scheduler: str = DEFAULT_SCHEDULER, steps: int = 25,
                    guidance: float | None = None, size: int | None = None, batch_size: int = 8,
                    allow_pickle: bool = False, lenient: bool = False, **scoring) -> dict:
    """The body of `adapt eval`: render `items` with the model (and the compare model, when given)
    and score them with run_eval (`scoring`: its refs_dir, refs_b_dir, set_dir, base_seed, style_dirs)."""
    guidance = infer.default_guidance(model) if guidance is None else guidance

    def renderer(model_name, lora_list, embedding_list=()):
        pipe = infer.load_pipeline(model_name, scheduler, loras=lora_list,
                                   embeddings=embedding_list, allow_pickle=allow_pickle, lenient=lenient)
        return lambda ps, ss: infer.generate(pipe, ps, ss, steps=steps, guidance=guidance, size=size, batch_size=batch_size)

    compare = renderer(compare_model, compare_loras) if (compare_model or compare_loras) else None
    return run_eval(renderer(model, loras, embeddings), items, out, compare=compare, batch_size=batch_size, **scoring)
