"""Scoring and reporting for `adapt eval`: what did fine-tuning actually learn?

Image generation is not done here: `run_eval` takes a `generate(prompts, seeds) -> [PIL.Image]`
callable, so this module is pure numpy/PIL and can be tested without a model (no torch import).

Feature space (fixed, documented, no learned network)
-----------------------------------------------------
Every image is converted to RGB with transparency composited on white (the same as
`adapt.images.to_rgb` / `load_rgb`), shrunk to 16x16 with a box (area-average) filter, scaled to
floats in [0, 1] and flattened: a 16*16*3 = 768-dimensional vector.  Distance is Euclidean (L2)
in that space.

Why this space: the base model makes 64x64 emoji, and "close to the reference" here means "same
overall colours and layout", not "same exact pixels".  Area-averaging 4x4 pixel blocks cancels
per-pixel sampling noise and small shifts, while keeping the silhouette and colour layout that tell
one emoji (or style) from another.  It needs no pretrained network (nothing to download, nothing
that changes between versions), so numbers stay comparable across runs and machines.  It is crude:
it measures colour layout, not semantics, so compare against the chance levels reported with each
metric rather than reading absolute values.  For scale: two images that differ by 0.1 in every
channel everywhere are sqrt(768 * 0.01) ~= 2.77 apart; black vs white is sqrt(768) ~= 27.7.
"""

from __future__ import annotations

import json
import math
import os

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import AdaptError
from .fileio import write_json
from .images import load_rgb, make_grid, save_image, to_rgb

FEATURE_SIZE = 16  # images are area-averaged down to FEATURE_SIZE x FEATURE_SIZE
FEATURE_DIM = FEATURE_SIZE * FEATURE_SIZE * 3  # 768

GenerateFn = Callable[[list, list], list]


# --------------------------------------------------------------------------------------------
# Feature space and distances
# --------------------------------------------------------------------------------------------


def _as_rgb(item: Any) -> Image.Image:
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.is_file():
            raise AdaptError(f"image not found: {path}")
        try:
            return load_rgb(path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise AdaptError(f"cannot read image {path}: {e}") from e
    raise TypeError(f"features() takes PIL images or file paths, not {type(item).__name__}")


def features(images: Iterable[Any]) -> np.ndarray:
    """Images (PIL images or file paths) -> float64 array [N, 768] in the fixed feature space.

    Each image: RGB with alpha composited on white -> 16x16 with a box (area) filter -> values in
    [0, 1] -> flattened (row-major, RGB interleaved).  See the module docstring for why this space.
    An empty input gives an array of shape [0, 768].
    """
    rows = []
    for item in images:
        small = _as_rgb(item).resize((FEATURE_SIZE, FEATURE_SIZE), Image.BOX)
        rows.append(np.asarray(small, dtype=np.float64).reshape(-1) / 255.0)
    if not rows:
        return np.zeros((0, FEATURE_DIM), dtype=np.float64)
    return np.stack(rows)


def _check_feats(x: Any, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [N, D] feature array, got shape {x.shape}")
    return x


def pairwise_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L2 distances [len(a), len(b)] between two feature arrays.

    Computed from explicit differences (not the |a|^2 - 2ab + |b|^2 expansion) so identical
    vectors are exactly 0 apart and identical references get bit-identical distances (ties are
    real ties).  Chunked over rows of `a` to bound memory.
    """
    a = _check_feats(a, "a")
    b = _check_feats(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    out = np.empty((a.shape[0], b.shape[0]), dtype=np.float64)
    if out.size == 0:
        return out
    chunk = max(1, int(2_000_000 // max(1, b.shape[0] * b.shape[1])))
    for start in range(0, a.shape[0], chunk):
        diff = a[start : start + chunk, None, :] - b[None, :, :]
        out[start : start + chunk] = np.sqrt(np.einsum("ijk,ijk->ij", diff, diff))
    return out


def _paired_distances(a: np.ndarray, b: np.ndarray, names: str) -> np.ndarray:
    a = _check_feats(a, "first array")
    b = _check_feats(b, "second array")
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {a.shape} and {b.shape}")
    return np.sqrt(((a - b) ** 2).sum(axis=1))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def retrieval(gen: np.ndarray, refs: np.ndarray, targets: Sequence[int]) -> dict:
    """Fidelity as retrieval: is each generated image nearest to the reference it was meant to be?

    gen: [N, D] features of generated images; refs: [M, D] reference features; targets: [N] index
    into refs of each generated image's intended reference.

    rank = 1 + number of references STRICTLY closer than the intended one.  Ties favour the
    intended reference: if the intended reference has an exact duplicate among the references,
    the image still ranks 1 (a duplicate reference is not the model's fault, and the alternative
    would make scores depend on reference order).  top1/top5 = fraction with rank <= 1 / <= 5
    (with M < 5 references every rank is <= 5, so top5 = 1.0 and so is its chance level).
    Chance levels are for a generator that ignores the prompt: top1 1/M, top5 min(5, M)/M.

    Returns {"top1", "top5", "mean_rank", "ranks", "nearest", "n", "m", "chance_top1",
    "chance_top5", "chance_mean_rank"} where "nearest" is each image's closest reference index.
    """
    gen = _check_feats(gen, "gen")
    refs = _check_feats(refs, "refs")
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    n, m = gen.shape[0], refs.shape[0]
    if n == 0:
        raise ValueError("retrieval needs at least one generated image")
    if m == 0:
        raise ValueError("retrieval needs at least one reference image")
    if targets.shape[0] != n:
        raise ValueError(f"got {targets.shape[0]} targets for {n} generated images")
    if targets.min() < 0 or targets.max() >= m:
        raise ValueError(f"targets must be indices in [0, {m}), got {targets.min()}..{targets.max()}")
    d = pairwise_distances(gen, refs)
    d_target = d[np.arange(n), targets]
    ranks = 1 + (d < d_target[:, None]).sum(axis=1)
    # Nearest reference; on ties prefer the intended one (consistent with the rank rule).
    nearest = np.where(ranks == 1, targets, d.argmin(axis=1))
    return {
        "top1": float((ranks <= 1).mean()),
        "top5": float((ranks <= 5).mean()),
        "mean_rank": float(ranks.mean()),
        "ranks": [int(r) for r in ranks],
        "nearest": [int(j) for j in nearest],
        "n": int(n),
        "m": int(m),
        "chance_top1": 1.0 / m,
        "chance_top5": min(5, m) / m,
        "chance_mean_rank": (m + 1) / 2.0,
    }


def style(gen: np.ndarray, set_a: np.ndarray, set_b: np.ndarray) -> dict:
    """Style preference: gen[i] is the same subject as set_a[i] and set_b[i], drawn in styles A/B.

    "a_rate" = fraction of generated images closer to their A reference than to their B
    reference; an exact tie counts as half (so identical A/B pairs give 0.5 = chance, not a bias).
    1.0 means every image looks more like style A.  Also returns the mean distances to A and B.
    """
    d_a = _paired_distances(gen, set_a, "gen and set_a")
    d_b = _paired_distances(gen, set_b, "gen and set_b")
    if d_a.shape[0] == 0:
        raise ValueError("style needs at least one generated image")
    wins = np.where(d_a < d_b, 1.0, np.where(d_a == d_b, 0.5, 0.0))
    return {
        "a_rate": float(wins.mean()),
        "mean_dist_a": float(d_a.mean()),
        "mean_dist_b": float(d_b.mean()),
        "n": int(d_a.shape[0]),
        "chance": 0.5,
    }


def drift(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Mean L2 distance between paired images of two models (same prompts and seeds).

    0 means the fine-tuned model draws exactly what the base model draws; larger = more change.
    """
    d = _paired_distances(feats_a, feats_b, "feats_a and feats_b")
    if d.shape[0] == 0:
        raise ValueError("drift needs at least one image pair")
    return float(d.mean())


def distance_to_set(gen: np.ndarray, refs: np.ndarray) -> float:
    """Mean over generated images of the L2 distance to the NEAREST reference.

    Lower = the images moved toward the reference set (e.g. "LoRA images moved toward
    examples/cat"); 0 when every generated image is one of the references.
    """
    gen = _check_feats(gen, "gen")
    refs = _check_feats(refs, "refs")
    if gen.shape[0] == 0 or refs.shape[0] == 0:
        raise ValueError("distance_to_set needs at least one generated and one reference image")
    return float(pairwise_distances(gen, refs).min(axis=1).mean())


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
) -> dict:
    """Generate one image per item, score it, write `eval.json` + `grid.png` into out_dir.

    generate(prompts: list[str], seeds: list[int]) -> list[PIL.Image] is called in batches of
    `batch_size`.  Items are dicts as from `read_prompts` ("caption"/"prompt", optional "file" and
    "seed"; a missing seed becomes base_seed + index).

    - refs_dir: items with a "file" are scored by `retrieval` against ALL distinct reference files
      named by the items (loaded from refs_dir), target = the item's own file.
    - refs_b_dir (needs refs_dir): `style` with A = refs_dir/file, B = refs_b_dir/file.
    - compare: a second generate callable (e.g. the base model) run on the same prompts and seeds;
      reports `drift` between the two models' images.
    - set_dir: a folder of images (e.g. the training images); reports `distance_to_set` of the
      generated images (and of the compare model's, when given): did the model move toward them?

    Returns the metrics dict (the same content as eval.json): "n", "fidelity", "style", "drift"
    (each None when not computed), "items" (per-item rows: caption, file, seed, rank, nearest,
    closer_to_a, drift) and "config".
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    if refs_b_dir is not None and refs_dir is None:
        raise AdaptError("a style-B reference directory needs a style-A reference directory too (refs_dir)")
    items = [_normalise_item(raw, i, base_seed, f"item {i}") for i, raw in enumerate(items)]
    if not items:
        raise AdaptError("nothing to evaluate: no prompts")
    out_dir = Path(out_dir)
    captions = [it["caption"] for it in items]
    seeds = [it["seed"] for it in items]
    n = len(items)

    gen_images = _generate_all(generate, captions, seeds, batch_size, progress, "eval")
    gen_feats = features(gen_images)
    rows = [
        {"caption": it["caption"], "file": it.get("file"), "seed": it["seed"], "rank": None}
        for it in items
    ]
    metrics: dict[str, Any] = {"n": n, "fidelity": None, "style": None, "drift": None, "set_distance": None}
    notes: list[str] = []

    # --- fidelity (retrieval) and style -----------------------------------------------------
    ref_by_item: list[Image.Image | None] = [None] * n
    with_file = [i for i, it in enumerate(items) if it.get("file")]
    if refs_dir is not None and not with_file:
        notes.append("refs given but no prompt names a reference \"file\": fidelity not computed")
    if refs_dir is not None and with_file:
        files = list(dict.fromkeys(items[i]["file"] for i in with_file))  # distinct, first-seen order
        refs_a = _load_refs(Path(refs_dir), files, "reference")
        index_of = {f: j for j, f in enumerate(files)}
        targets = [index_of[items[i]["file"]] for i in with_file]
        fid = retrieval(gen_feats[with_file], features(refs_a), targets)
        for k, i in enumerate(with_file):
            rows[i]["rank"] = fid["ranks"][k]
            rows[i]["nearest"] = files[fid["nearest"][k]]
            ref_by_item[i] = refs_a[targets[k]]
        fid["references"] = files
        metrics["fidelity"] = fid
        if len(with_file) < n:
            notes.append(f"{n - len(with_file)} of {n} prompts have no reference \"file\": not in fidelity")

        if refs_b_dir is not None:
            refs_b = _load_refs(Path(refs_b_dir), files, "style-B reference")
            feats_a = features([refs_a[t] for t in targets])
            feats_b = features([refs_b[t] for t in targets])
            sty = style(gen_feats[with_file], feats_a, feats_b)
            d_a = _paired_distances(gen_feats[with_file], feats_a, "gen and A")
            d_b = _paired_distances(gen_feats[with_file], feats_b, "gen and B")
            for k, i in enumerate(with_file):
                rows[i]["closer_to_a"] = bool(d_a[k] < d_b[k])
            metrics["style"] = sty

    # --- drift against a second model ------------------------------------------------------
    cmp_images: list[Image.Image] | None = None
    if compare is not None:
        cmp_images = _generate_all(compare, captions, seeds, batch_size, progress, "compare")
        cmp_feats = features(cmp_images)
        per_item = _paired_distances(gen_feats, cmp_feats, "model and compare features")
        metrics["drift"] = float(per_item.mean())
        for i in range(n):
            rows[i]["drift"] = float(per_item[i])

    if set_dir is not None:
        from .data import list_images

        set_feats = features(list_images(set_dir))
        metrics["set_distance"] = {
            "model": distance_to_set(gen_feats, set_feats),
            "compare": None if cmp_images is None else distance_to_set(cmp_feats, set_feats),
            "set_images": int(set_feats.shape[0]),
        }

    metrics["items"] = rows
    metrics["notes"] = notes
    metrics["config"] = {
        "refs_dir": None if refs_dir is None else str(refs_dir),
        "refs_b_dir": None if refs_b_dir is None else str(refs_b_dir),
        "compare": compare is not None,
        "set_dir": None if set_dir is None else str(set_dir),
        "base_seed": base_seed,
        "batch_size": batch_size,
        "feature_space": f"RGB on white, box-resized to {FEATURE_SIZE}x{FEATURE_SIZE}, [0,1], L2",
    }

    # --- grid: [reference | generated | compare] per item when available ----------------------
    size = gen_images[0].size
    blank = Image.new("RGB", size, (255, 255, 255))
    has_refs = any(r is not None for r in ref_by_item)
    per_item_cells = 1 + int(has_refs) + int(cmp_images is not None)
    cells: list[Image.Image] = []
    for i in range(n):
        if has_refs:
            ref = ref_by_item[i]
            cells.append(blank if ref is None else ref.resize(size, Image.BOX))
        cells.append(gen_images[i])
        if cmp_images is not None:
            cells.append(cmp_images[i])
    groups_per_row = max(1, math.ceil(math.sqrt(n)))
    save_image(make_grid(cells, cols=groups_per_row * per_item_cells), out_dir / "grid.png")
    metrics["grid_layout"] = ["reference"] * has_refs + ["generated"] + ["compare"] * (cmp_images is not None)

    write_json(out_dir / "eval.json", metrics)
    return metrics


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
