"""Choose the emoji subset the small text-to-image base model is trained on.

The subset is every emoji in the categories "Animals & Nature" and "Food & Drink", plus every
emoji whose name contains "cat" as a whole word (the 12 cat emoji: "black cat", "cat",
"cat face" and the nine "... cat face" smileys). Substrings such as "identification card" or
"heavy multiplication x" do not match because the match is on word boundaries.

Writes ``training_set.jsonl`` with one line per emoji, sorted by file name:
``{"name": ..., "file": ..., "caption": "an emoji of {name}"}``.

The selection is deterministic (no randomness); ``--seed`` is accepted for uniformity with the
other build scripts and only seeds Python's ``random`` module.

Usage (from the repo root)::

    PYTHONPATH=. python examples/build_base/select_emoji.py \
        --metadata /work/shared/data/emoji/metadata.jsonl \
        --out outputs/base-build/training_set.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "emoji"

CATEGORIES = ("Animals & Nature", "Food & Drink")
CAT_WORD = re.compile(r"\bcat\b")
EXPECTED_CATS = {
    "black cat",
    "cat",
    "cat face",
    "grinning cat face with smiling eyes",
    "cat face with tears of joy",
    "smiling cat face with open mouth",
    "smiling cat face with heart-shaped eyes",
    "cat face with wry smile",
    "kissing cat face with closed eyes",
    "pouting cat face",
    "crying cat face",
    "weary cat face",
}


def caption_for(name: str) -> str:
    return f"an emoji of {name}"


def select(metadata_path: str | os.PathLike) -> list[dict]:
    """Return the training subset as ``[{"name", "file", "caption"}, ...]`` sorted by file."""
    rows = []
    with open(metadata_path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            meta = json.loads(line)
            name = meta["name"]
            if meta.get("category") in CATEGORIES or CAT_WORD.search(name):
                rows.append({"name": name, "file": meta["file"], "caption": caption_for(name)})
    rows.sort(key=lambda r: r["file"])
    files = [r["file"] for r in rows]
    if len(files) != len(set(files)):
        raise ValueError(f"duplicate file names in {metadata_path}")
    return rows


def write_jsonl(rows: list[dict], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--metadata", default=str(DEFAULT_DATA / "metadata.jsonl"))
    p.add_argument("--images", default=str(DEFAULT_DATA / "noto"),
                   help="image folder used only to check that every selected file exists")
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "base-build" / "training_set.jsonl"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    random.seed(args.seed)

    rows = select(args.metadata)
    cats = {r["name"] for r in rows if CAT_WORD.search(r["name"])}
    missing = EXPECTED_CATS - cats
    assert not missing, f"cat emoji missing from the selection: {sorted(missing)}"
    assert cats == EXPECTED_CATS, f"unexpected cat matches: {sorted(cats - EXPECTED_CATS)}"
    absent = [r["file"] for r in rows if not (Path(args.images) / r["file"]).exists()]
    assert not absent, f"{len(absent)} selected files missing under {args.images}: {absent[:5]}"

    out = write_jsonl(rows, args.out)
    by_cat: dict[str, int] = {}
    with open(args.metadata, encoding="utf-8") as f:
        cat_of = {m["file"]: m["category"] for m in map(json.loads, filter(str.strip, f))}
    for r in rows:
        by_cat[cat_of[r["file"]]] = by_cat.get(cat_of[r["file"]], 0) + 1
    print(f"selected {len(rows)} emoji ({len(cats)} cats) -> {out}")
    for k, v in sorted(by_cat.items()):
        print(f"  {k}: {v}")


if __name__ == "__main__":
    main()
