"""What the bundled base knows, and what each method teaches it: one table.

    python benchmarks/learning.py                         # the bundled base, ~10 min on 2 CPU cores
    python benchmarks/learning.py --model PATH --only base,lora

Needs the emoji data the base was built from (`--data`, default ../shared/data/emoji: one folder
per style, same file name = same emoji). Images are compared in adapt's eval feature space
(adapt/metrics.py: 16x16 area-averaged RGB, L2). Training runs go through the `adapt` CLI with
its defaults and the model's adapt.json, exactly as a user runs them.

Rows (targets from issue 13):
  base/train     prompts of training cells with their style phrase: own emoji in the top 5 among
                 the same style's references of every base emoji (>= 0.90)
  base/heldout   held-out (emoji, style) cells: own emoji in the top 5 (>= 0.50); the style
                 asked for is the nearest of the emoji's five styles (>= 0.70)
  base/unstyled  `an emoji of {name}`, 8 seeds: distinct nearest styles per prompt (>= 3)
  base/<sks>     `an emoji of <sks> cat face`: nearest of all base cells is a cat emoji (>= 0.90)
  lora           quickstart LoRA: nearest among the cat images of all six styles is Twemoji (>= 0.75)
  style-lora     LoRA on 16 Twemoji emoji; 32 other emoji closer to their Twemoji image than to
                 any of their five base-style images (>= 0.80)
  dreambooth     class-prompt drift with prior / without (<= 0.33); instance as the LoRA's rate
  dreambooth-lora  the same for `adapt dreambooth --lora`
  ti             `an emoji of <cat-toy>` nearest to a Twemoji cat (>= 0.50)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapt.metrics import features, nearest_style, pairwise_distances  # noqa: E402

STYLES = ("noto", "openmoji", "fluent-flat", "fluent-modern", "fluent-line")
CAT_PROMPT = "an emoji of <sks> cat face"
SEEDS = list(range(16))


class Bench:
    def __init__(self, model: Path, data: Path, work: Path):
        from adapt.models import model_defaults

        self.model, self.data, self.work = model, data, work
        self.defaults = model_defaults(model)
        self.phrases = self.defaults.get("styles", {})
        self.guidance = self.defaults.get("guidance", 7.5)
        self.train = [json.loads(x) for x in (model / "training_set.jsonl").read_text().splitlines()]
        self.heldout = [json.loads(x) for x in (model / "heldout.jsonl").read_text().splitlines()]
        self.emoji = {c["file"]: c["name"] for c in self.train + self.heldout}
        self.rows: list[tuple[str, str, str, str]] = []
        self.picture: list[tuple[str, list]] = []  # (label, 8 images) rows of the README picture
        self.images: list = []  # the last render's images
        self._feats: dict[tuple[str, str], np.ndarray] = {}
        self.base_cats: list = []

    def ref(self, style: str, files: list[str]) -> np.ndarray:
        missing = [f for f in files if (style, f) not in self._feats]
        for f, v in zip(missing, features([self.data / style / f for f in missing])):
            self._feats[(style, f)] = v
        return np.stack([self._feats[(style, f)] for f in files])

    def has(self, style: str, file: str) -> bool:
        return (self.data / style / file).is_file()

    def render(self, prompts: list[str], seeds: list[int], model: Path | None = None, **kw) -> np.ndarray:
        from adapt.infer import generate, load_pipeline

        pipe = load_pipeline(str(model or self.model), "dpm++2m-karras", **kw)
        self.images = generate(pipe, prompts, seeds, steps=25, guidance=self.guidance, batch_size=16)
        return features(self.images)

    def save_picture(self, path: Path) -> None:
        """The picture rows, 8 images each, with their labels on the left."""
        from PIL import Image, ImageDraw

        from adapt.images import load_rgb

        w, size = 250, 64
        sheet = Image.new("RGB", (w + 8 * size, size * len(self.picture)), "white")
        draw = ImageDraw.Draw(sheet)
        for r, (label, images) in enumerate(self.picture):
            draw.text((4, r * size + 26), label, fill="black")
            for c, img in enumerate(images[:8]):
                img = load_rgb(img) if isinstance(img, Path) else img
                sheet.paste(img.resize((size, size)), (w + c * size, r * size))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)

    def row(self, name: str, measured: str, target: str, note: str = "") -> None:
        self.rows.append((name, measured, target, note))
        print(f"{name:<34} {measured:>10}  target {target:<8} {note}", flush=True)

    def adapt(self, *args: str) -> float:
        """Run an adapt command on this model; returns its wall time in seconds."""
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "adapt", *args, "--model", str(self.model)], check=True, cwd=self.work)
        return time.perf_counter() - t


def top5_same_style(b: Bench, cells: list[dict]) -> tuple[float, list[int], np.ndarray]:
    """(top-5 rate, ranks, features of the generated images) for styled prompts of `cells`."""
    prompts = [f"an emoji of {c['name']}, {b.phrases[c['style']]}" for c in cells]
    gen = b.render(prompts, list(range(len(cells))))
    ranks = []
    for style in STYLES:
        idx = [i for i, c in enumerate(cells) if c["style"] == style]
        if not idx:
            continue
        files = sorted(f for f in b.emoji if b.has(style, f))
        d = pairwise_distances(gen[idx], b.ref(style, files))
        for k, i in enumerate(idx):
            own = d[k, files.index(cells[i]["file"])]
            ranks.append(1 + int((d[k] < own).sum()))
    return float(np.mean([r <= 5 for r in ranks])), ranks, gen


def bench_base(b: Bench) -> None:
    rng = random.Random(0)
    sample = [c for s in STYLES for c in rng.sample([c for c in b.train if c["style"] == s], 20)]
    top5, _, _ = top5_same_style(b, sample)
    b.row("base/train top-5 (same style)", f"{top5:.3f}", ">= 0.90", f"{len(sample)} cells, chance ~{5 / 450:.3f}")
    top5, _, gen = top5_same_style(b, b.heldout)
    b.row("base/heldout top-5 (same style)", f"{top5:.3f}", ">= 0.50", f"{len(b.heldout)} held-out cells")
    ok = []
    for i, c in enumerate(b.heldout):
        styles = [s for s in STYLES if b.has(s, c["file"])]
        got = nearest_style(gen[i:i + 1], {s: b.ref(s, [c["file"]]) for s in styles})[0]
        ok.append(got == c["style"])
    b.row("base/heldout style = nearest of 5", f"{np.mean(ok):.3f}", ">= 0.70", "chance 0.200")

    full = sorted(f for f in b.emoji if all(b.has(s, f) for s in STYLES))
    picks = random.Random(1).sample(full, 24)
    prompts = [f"an emoji of {b.emoji[f]}" for f in picks for _ in range(8)]
    gen = b.render(prompts, list(range(8)) * len(picks))
    counts = []
    for k, f in enumerate(picks):
        got = nearest_style(gen[8 * k:8 * k + 8], {s: np.repeat(b.ref(s, [f]), 8, 0) for s in STYLES})
        counts.append(len(set(got)))
    b.row("base/unstyled styles per 8 seeds", f"{np.mean(counts):.2f}", ">= 3", f"{len(picks)} emoji")

    cells = [(s, f) for f in sorted(b.emoji) for s in STYLES if b.has(s, f)]
    refs = np.stack([b.ref(s, [f])[0] for s, f in cells])
    cats = {f for f, n in b.emoji.items() if "cat" in n.split()}
    for prompt in ("an emoji of cat face", CAT_PROMPT):
        nearest = pairwise_distances(b.render([prompt] * len(SEEDS), SEEDS), refs).argmin(1)
        b.base_cats = b.images
        rate = np.mean([cells[j][1] in cats for j in nearest])
        b.row(f"base/'{prompt}' -> a cat", f"{rate:.3f}", ">= 0.90" if "<sks>" in prompt else "-",
              f"nearest of {len(cells)} cells")


def twemoji_cat_rate(b: Bench, gen: np.ndarray) -> float:
    """Fraction of images whose nearest cat image (12 cat emoji x 6 styles) is a Twemoji one."""
    cats = sorted(f for f, n in b.emoji.items() if "cat" in n.split())
    cells = [(s, f) for s in (*STYLES, "twemoji") for f in cats if b.has(s, f)]
    refs = np.stack([b.ref(s, [f])[0] for s, f in cells])
    return float(np.mean([cells[j][0] == "twemoji" for j in pairwise_distances(gen, refs).argmin(1)]))


def bench_lora(b: Bench) -> float:
    if not b.base_cats:
        b.render([CAT_PROMPT] * len(SEEDS), SEEDS)
        b.base_cats = b.images
    out = b.work / "cat-lora"
    wall = b.adapt("lora", "--images", str(ROOT / "examples" / "cat"), "--token", "<sks>", "--output", str(out))
    rate = twemoji_cat_rate(b, b.render([CAT_PROMPT] * len(SEEDS), SEEDS,
                                        loras=[(str(out / "pytorch_lora_weights.safetensors"), 1.0)]))
    b.row("lora: '<sks> cat face' -> Twemoji", f"{rate:.3f}", ">= 0.75", f"quickstart, {wall:.0f} s wall")
    b.picture += [("examples/cat (Twemoji, training)", sorted((ROOT / "examples" / "cat").glob("*.png"))),
                  ("base: an emoji of <sks> cat face", b.base_cats), ("quickstart LoRA", b.images)]
    return rate


def bench_style_lora(b: Bench) -> None:
    full = sorted(f for f in b.emoji if all(b.has(s, f) for s in (*STYLES, "twemoji")) and "cat" not in b.emoji[f].split())
    picks = random.Random(2).sample(full, 48)
    train, test = picks[:16], picks[16:]
    folder = b.work / "twemoji-style"
    folder.mkdir(exist_ok=True)
    for f in train:
        shutil.copyfile(b.data / "twemoji" / f, folder / f)
        (folder / f).with_suffix(".txt").write_text(f"an emoji of {b.emoji[f]}, {{token}} style")
    out = b.work / "style-lora"
    b.adapt("lora", "--images", str(folder), "--token", "twemoji", "--output", str(out))
    gen = b.render([f"an emoji of {b.emoji[f]}, twemoji style" for f in test], list(range(len(test))),
                   loras=[(str(out / "pytorch_lora_weights.safetensors"), 1.0)])
    got = nearest_style(gen, {s: b.ref(s, test) for s in ("twemoji", *STYLES)})
    lora_images = b.images
    b.render([f"an emoji of {b.emoji[f]}, twemoji style" for f in test[:8]], list(range(8)))
    b.picture += [("held-out emoji, Twemoji", [b.data / "twemoji" / f for f in test]),
                  ("base: ..., twemoji style", b.images), ("style LoRA (16 other emoji)", lora_images)]
    b.row("style-lora: held-out -> Twemoji", f"{np.mean([g == 'twemoji' for g in got]):.3f}", ">= 0.80",
          "16 train / 32 held-out emoji")


def bench_dreambooth(b: Bench, lora_rate: float | None, lora: bool = False) -> None:
    """DreamBooth on examples/cat with prior preservation and without: the class prompt's drift from the base's
    images, and the instance prompt's Twemoji rate; `lora`: its LoRA variant (`adapt dreambooth --lora`)."""
    class_prompt, name = "an emoji of cat face", "dreambooth-lora" if lora else "dreambooth"
    base = b.render([class_prompt] * len(SEEDS), SEEDS)
    drift = {}
    for prior in (True, False):
        out = b.work / f"{name}-{prior}"
        b.adapt("dreambooth", *(["--lora"] if lora else []), "--images", str(ROOT / "examples" / "cat"), "--token", "sks",
                "--class-word", "cat face", "--class-prompt", class_prompt, "--num-class-images", "16", "--output", str(out),
                "--prior-preservation" if prior else "--no-prior-preservation")
        trained = {"loras": [(str(out / "pytorch_lora_weights.safetensors"), 1.0)]} if lora else {"model": out}
        drift[prior] = float(np.linalg.norm(b.render([class_prompt] * len(SEEDS), SEEDS, **trained) - base, axis=1).mean())
        if prior:
            rate = twemoji_cat_rate(b, b.render(["an emoji of sks cat face"] * len(SEEDS), SEEDS, **trained))
            b.picture.append((f"{'DreamBooth LoRA' if lora else 'DreamBooth'}: an emoji of sks cat face", b.images))
    b.row(f"{name}: class drift prior/none", f"{drift[True] / drift[False]:.3f}", "<= 0.33",
          f"{drift[True]:.2f} / {drift[False]:.2f}")
    b.row(f"{name}: 'sks cat face' -> Twemoji", f"{rate:.3f}", f">= {lora_rate:.2f}" if lora_rate is not None else "lora's")


def bench_ti(b: Bench) -> None:
    out = b.work / "cat-ti"
    b.adapt("textual-inversion", "--images", str(ROOT / "examples" / "cat"), "--token", "<cat-toy>", "--init-token", "cat",
            "--output", str(out))
    gen = b.render(["an emoji of <cat-toy>"] * len(SEEDS), SEEDS, embeddings=[(str(out / "learned_embeds.safetensors"), None)])
    b.row("ti: '<cat-toy>' -> Twemoji cat", f"{twemoji_cat_rate(b, gen):.3f}", ">= 0.50")
    b.picture.append(("TI: an emoji of <cat-toy>", b.images))


def main() -> None:
    from adapt.models import BUNDLED_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(BUNDLED_MODEL))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "emoji"))
    p.add_argument("--only", default="base,lora,style,dreambooth,dreambooth-lora,ti")
    p.add_argument("--keep", default=None, help="keep the runs in this folder")
    p.add_argument("--picture", default=None, help="write the README picture here (e.g. docs/quickstart.png)")
    a = p.parse_args()
    if not all((Path(a.data) / s).is_dir() for s in (*STYLES, "twemoji")):
        sys.exit(f"error: {a.data} is not the emoji data folder (one sub-folder per style: {', '.join(STYLES)}, twemoji); "
                 "pass --data DIR")
    if not (Path(a.model) / "heldout.jsonl").is_file():
        sys.exit(f"error: {a.model} has no heldout.jsonl; pass --model with a base built by examples/build_base/build.py")
    work = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="adapt-learning-"))
    work.mkdir(parents=True, exist_ok=True)
    b, only, rate = Bench(Path(a.model).resolve(), Path(a.data).resolve(), work), a.only.split(","), None
    t = time.perf_counter()
    if "base" in only:
        bench_base(b)
    if "lora" in only:
        rate = bench_lora(b)
    if "dreambooth" in only:
        bench_dreambooth(b, rate)
    if "dreambooth-lora" in only:
        bench_dreambooth(b, rate, lora=True)
    if "ti" in only:
        bench_ti(b)
    if "style" in only:
        bench_style_lora(b)
    print("\n| measure | value | target | note |\n|---|---|---|---|")
    for r in b.rows:
        print("| " + " | ".join(r) + " |")
    print(f"\n{time.perf_counter() - t:.0f} s on {Path(a.model).name}; runs in {work}")
    if a.picture:
        b.save_picture(Path(a.picture))
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
