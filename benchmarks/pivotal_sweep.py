"""Pivotal tuning against LoRA and textual inversion on the bundled base (issue 17): eval's distance to
examples/cat of 16 seeds' images of "an emoji of <sks> cat face" (or --prompt), after `steps` steps of each run.

Runs are named on the command line:

* lora: LoRA alone at the model's lr;
* ti:LR:INIT: textual inversion at lr LR from --init-token INIT;
* piv:LR:FRACTION:INIT[:N]: pivotal tuning, LoRA at the model's lr, embedding at LR ("default": the
  lr x methods/pivotal.py's EMBEDDING_LR_FRACTION that `adapt lora --pivotal` takes), stopped after
  FRACTION of the steps, from INIT, with N vectors (default 1; INIT "<sks>" with N 3 starts each
  vector from one of the token's own pieces < sks >, where LoRA alone starts);
* any of them +FIELD=VALUE...: TrainConfig fields set for that run, e.g. lora+lr=2e-3+caption_dropout=0.1.
* lora@WORD: LoRA alone with the existing word WORD as its token (the captions and the prompt say WORD where the
  others say <sks>), e.g. lora@flat against piv:default:1:flat.

    python benchmarks/pivotal_sweep.py --steps 150 lora ti:5e-3:cat piv:1e-4:1:cat piv:1e-3:0.5:sks piv:1e-4:1:<sks>:3

--twemoji also prints each run's Twemoji-cat share (tests/test_learning.py's measure: of the 16 images, the share whose
nearest of 12 cat emoji x 6 styles is a Twemoji one), which tells Twemoji's cats from the base's flat Fluent ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LORA, EMBEDS = "pytorch_lora_weights.safetensors", "learned_embeds.safetensors"
TOKEN, SEEDS = "<sks>", list(range(16))
PROMPT = f"an emoji of {TOKEN} cat face"


def method(name: str, steps: int, lr: float):
    """(method, its learning rates, how generate loads its file, the file) for a run's name."""
    from adapt.config import LoraConfig, TextualInversionConfig
    from adapt.methods.lora import LoraMethod
    from adapt.methods.pivotal import EMBEDDING_LR_FRACTION, PivotalMethod
    from adapt.methods.textual_inversion import TextualInversionMethod

    kind, *args = name.split(":")
    if kind == "lora":
        return LoraMethod(LoraConfig()), {"lr": lr}, "loras", LORA
    if kind == "ti":
        return (TextualInversionMethod(TextualInversionConfig(init_token=args[1]), TOKEN), {"lr": float(args[0])},
                "embeddings", EMBEDS)
    if kind == "piv":
        cfg = LoraConfig(pivotal=True, init_token=args[2], embedding_steps_fraction=float(args[1]),
                         num_vectors=int(args[3]) if len(args) > 3 else 1)
        embedding_lr = lr * EMBEDDING_LR_FRACTION if args[0] == "default" else float(args[0])
        return PivotalMethod(cfg, TOKEN, steps), {"lr": lr, "embedding_lr": embedding_lr}, "loras", LORA
    raise SystemExit(f"unknown run {name!r}: lora, ti:LR:INIT or piv:LR:FRACTION:INIT[:N]")


def distance(name: str, steps: int, seed: int = 0, grid: Path | None = None, prompt: str = PROMPT,
             guidance: float | None = None) -> float:
    """Train run `name` for `steps` steps (training --seed `seed`) on examples/cat, render 16 seeds of `prompt`, return eval's
    distance to the cats (adapt/metrics.py distance_to_set; lower = closer) at `guidance` (None: the model's); `grid`: also
    save the 16 images there, side by side, to look at.
    tests/test_pivotal_quality.py calls this too."""
    return score(render(name, steps, seed, prompt, guidance), grid)


def score(images: list, grid: Path | None = None) -> float:
    """Eval's distance of `images` to the cats; `grid`: also save them there as one strip."""
    from adapt.images import make_grid
    from adapt.metrics import distance_to_set, features

    if grid is not None:
        make_grid(images, cols=len(images)).save(grid)
    return distance_to_set(features(images), features(sorted((ROOT / "examples" / "cat").glob("*.png"))))


def render(name: str, steps: int, seed: int, prompt: str, guidance: float | None) -> list:
    """The 16 images of `prompt` after training run `name` (see distance)."""
    from adapt.data import instance_examples
    from adapt.infer import generate, load_pipeline
    from adapt.models import BUNDLED_MODEL, load_components, model_defaults
    from adapt.train import train
    from adapt.train_config import TrainConfig

    cat, defaults = ROOT / "examples" / "cat", model_defaults(BUNDLED_MODEL)
    name, *fields = name.split("+")
    name, _, token = name.partition("@")
    if token and name != "lora":
        raise SystemExit(f"run {name!r}@{token}: @WORD is for lora (LoRA alone with an existing word as its token)")
    token = token or TOKEN
    m, rates, kind, file = method(name, steps, defaults["lora"]["lr"])
    for f in fields:
        k, eq, v = f.partition("=")
        try:
            if not eq or k not in TrainConfig.__dataclass_fields__:
                raise ValueError
            rates[k] = float(v)
        except ValueError:
            raise SystemExit(f"run {name!r}: +{f} is not +FIELD=NUMBER with a TrainConfig field (e.g. +caption_dropout=0.1)") from None
    with tempfile.TemporaryDirectory() as out:
        train(load_components(None), m, instance_examples(cat, token, "x"), TrainConfig(steps=steps, seed=seed, **rates), Path(out),
              resolution=64, progress=False)
        pipe = load_pipeline(None, "dpm++2m-karras", **{kind: [(str(Path(out) / file), 1.0 if kind == "loras" else None)]})
        return generate(pipe, [prompt.replace(TOKEN, token)] * len(SEEDS), SEEDS, steps=25,
                        guidance=defaults["guidance"] if guidance is None else guidance, batch_size=16)


def twemoji_share(images: list) -> float:
    """tests/test_learning.py's Twemoji-cat rate of `images` (a benchmark of the test suite's own measure)."""
    if str(ROOT / "tests") not in sys.path:  # called once per run
        sys.path.insert(0, str(ROOT / "tests"))
    from test_learning import _twemoji_cat_rate

    from adapt.metrics import features

    return _twemoji_cat_rate(features(images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0", help="training seeds, comma-separated: each run once per seed (paired: "
                    "at one seed, pivotal's LoRA starts from LoRA alone's init, data order and noise)")
    ap.add_argument("--images", type=Path, help="save each run's 16 images as one PNG strip (a row) in this folder")
    ap.add_argument("--prompt", default=PROMPT, help="what to render after training (e.g. 'an emoji of cat face': does the "
                    "token carry the concept, or did the whole class move?)")
    ap.add_argument("--twemoji", action="store_true", help="also print each run's Twemoji-cat share (module docstring)")
    ap.add_argument("--guidance", type=float, help="render at this guidance instead of the model's (the bundled base: "
                    "3): how much of a run's difference does guidance make?")
    a = ap.parse_args()
    if a.images:
        a.images.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(a.threads)
    for seed in map(int, a.seeds.split(",")):
        for name in a.runs:
            start = time.time()
            grid = a.images / f"{name.replace(':', '_').replace('<', '').replace('>', '')}-seed{seed}.png" if a.images else None
            images = render(name, a.steps, seed, a.prompt, a.guidance)
            extra = {} if a.guidance is None else {"guidance": a.guidance}
            if a.twemoji:
                extra["twemoji"] = round(twemoji_share(images), 4)
            print(json.dumps({"run": name, "steps": a.steps, "seed": seed, **extra, "distance": round(score(images, grid), 3),
                              "s": round(time.time() - start)}), flush=True)


if __name__ == "__main__":
    main()
