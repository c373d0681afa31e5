"""The metrics of `adapt eval`, pure numpy/PIL (no torch): features, distances, retrieval, style,
drift, distance to a set, nearest style among several reference sets, diversity across seeds.

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

import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from .errors import AdaptError
from .images import load_rgb, to_rgb

FEATURE_SIZE = 16  # images are area-averaged down to FEATURE_SIZE x FEATURE_SIZE
FEATURE_DIM = FEATURE_SIZE * FEATURE_SIZE * 3  # 768

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


def nearest_style(gen: np.ndarray, styles: dict[str, np.ndarray]) -> list[str]:
    """For each generated image, the style whose image of the same subject is closest:
    styles = {name: [N, D] features, row i = subject i drawn in that style}. Ties go to the
    first style in order."""
    names = list(styles)
    if not names:
        raise ValueError("nearest_style needs at least one style")
    d = np.stack([_paired_distances(gen, styles[s], f"gen and style {s!r}") for s in names], axis=1)
    return [names[j] for j in d.argmin(axis=1)]


def diversity(gen: np.ndarray, groups: Sequence[Any]) -> dict:
    """How different the images of one prompt are across seeds: per group (e.g. caption) of >= 2
    images, the mean pairwise L2 distance; returns {"mean", "groups", "per_group"}. 0 = every seed
    draws the same picture (a memorised lookup); None when no group has two images."""
    gen = _check_feats(gen, "gen")
    by: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    per = {}
    for g, idx in by.items():
        if len(idx) >= 2:
            d = pairwise_distances(gen[idx], gen[idx])
            per[g] = float(d[np.triu_indices(len(idx), 1)].mean())
    return {"mean": float(np.mean(list(per.values()))) if per else None, "groups": len(per), "per_group": per}

