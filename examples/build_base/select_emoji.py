"""Stage 1 of the base-model build: choose the (emoji, style) cells and hold some out.

The base model learns the emoji of two categories, "Animals & Nature" and "Food & Drink", and the
12 cat emoji (297 emoji), in every style the data has for them except Twemoji: `noto`, `openmoji`, `fluent-flat`, `fluent-modern`, `fluent-line`. Twemoji
stays out of the base entirely; it is the new style and subject that users teach it.

A fixed-seed 6% of the cells (never a cat emoji, and never the last training style of an emoji),
drawn over the cells of those two categories and "Smileys & Emotion" and then restricted to the
trained ones, is held out: `heldout.jsonl` names them. They measure whether the base composes a known emoji
with a known style it never saw together.

Writes ``training_set.jsonl`` and ``heldout.jsonl``, one line per cell, sorted by (file, style):
``{"file", "name", "style", "keywords"}``.

Usage (from the repo root)::

    python examples/build_base/select_emoji.py --data ../shared/data/emoji --out outputs/base-build
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "emoji"

# The held-out draw is made over these three categories (as in the build that trained the shipped VAE,
# so its held-out cells are cells that VAE never saw); the base then trains on TRAINED only.
CATEGORIES = ("Animals & Nature", "Food & Drink", "Smileys & Emotion")
TRAINED = ("Animals & Nature", "Food & Drink")
STYLES = ("noto", "openmoji", "fluent-flat", "fluent-modern", "fluent-line")
CAT_WORD = re.compile(r"\bcat\b")
HELDOUT_FRACTION = 0.06


def select(metadata: Path, data: Path) -> list[dict]:
    """Every (emoji, style) cell of the chosen categories whose image exists, sorted."""
    cells = []
    for line in metadata.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        meta = json.loads(line)
        if meta.get("category") not in CATEGORIES and not CAT_WORD.search(meta["name"]):
            continue
        for style in STYLES:
            if style in meta["styles"] and (data / style / meta["file"]).is_file():
                cells.append({"file": meta["file"], "name": meta["name"], "style": style,
                              "keywords": meta.get("keywords") or [], "category": meta.get("category")})
    cells.sort(key=lambda c: (c["file"], STYLES.index(c["style"])))
    return cells


def hold_out(cells: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split off `fraction` of the cells by a fixed seed, keeping every emoji in >= 1 training
    style and every cat emoji whole (the quickstart's subject)."""
    rng = random.Random(seed)
    order = list(range(len(cells)))
    rng.shuffle(order)
    left = {}
    for c in cells:
        left[c["file"]] = left.get(c["file"], 0) + 1
    target, held = round(fraction * len(cells)), set()
    for i in order:
        c = cells[i]
        if len(held) >= target:
            break
        if CAT_WORD.search(c["name"]) or left[c["file"]] < 2:
            continue
        held.add(i)
        left[c["file"]] -= 1
    return [c for i, c in enumerate(cells) if i not in held], [c for i, c in enumerate(cells) if i in held]


def restrict(cells: list[dict]) -> list[dict]:
    """The cells of TRAINED categories (and every cat): ~160 near-identical yellow smileys would take
    a third of the UNet's budget."""
    keep = [c for c in cells if c.pop("category") in TRAINED or CAT_WORD.search(c["name"])]
    return keep


def write_jsonl(rows: list[dict], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="emoji folder (style folders + metadata.jsonl)")
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "base-build"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    if not (data / "metadata.jsonl").is_file():
        raise SystemExit(f"error: {data} has no metadata.jsonl; pass --data with the emoji data folder")
    out.mkdir(parents=True, exist_ok=True)
    cells = select(data / "metadata.jsonl", data)
    train, held = (restrict(part) for part in hold_out(cells, HELDOUT_FRACTION, a.seed))
    write_jsonl(held, out / "heldout.jsonl")
    write_jsonl(train, out / "training_set.jsonl")  # last: the stage counts as done when it exists
    cells = train + held
    emoji = {c["file"] for c in cells}
    print(f"{len(emoji)} emoji, {len(cells)} cells: {len(train)} training, {len(held)} held out "
          f"({len(held) / len(cells):.1%})")
    for s in STYLES:
        print(f"  {s}: {sum(c['style'] == s for c in train)} training, {sum(c['style'] == s for c in held)} held out")


if __name__ == "__main__":
    main()
