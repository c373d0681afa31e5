"""Stage 4 of the base-model build: train the UNet and the text encoder together.

Runs on adapt's one training loop (`adapt.train.train`) with `FullMethod(train_text_encoder=True)`:
the VAE is frozen and its latents are cached once per image, the UNet and the CLIP text encoder
learn from scratch on the cells of `training_set.jsonl`, each with `captions.VARIANTS` seeded
captions (see captions.py), 10% of captions dropped to "" so classifier-free guidance works, and
min-SNR loss weighting (gamma 5) for faster convergence. Checkpoints are written every
`--checkpoint-every` steps; running the same command again resumes from the newest one.

Usage (from the repo root)::

    PYTHONPATH=. python examples/build_base/train_base.py \
        --images ../shared/data/emoji/noto --training-set outputs/base-build/training_set.jsonl \
        --init outputs/base-build/init --out outputs/base-build/base
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "emoji"
BUILD = REPO_ROOT / "outputs" / "base-build"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DEFAULT_DATA), help="emoji folder with one sub-folder per style")
    p.add_argument("--training-set", default=str(BUILD / "training_set.jsonl"))
    p.add_argument("--init", default=str(BUILD / "init"), help="pipeline folder from init_pipeline.py")
    p.add_argument("--out", default=str(BUILD / "base"))
    p.add_argument("--steps", type=int, default=4800)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--snr-gamma", type=float, default=5.0)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--checkpoint-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    p.add_argument("--measure", type=int, default=0, help="only time N steps (no resume, no save kept)")
    return p.parse_args(argv)


def build_examples(a) -> list:
    """The training examples: each cell of --training-set with its seeded captions (captions.py);
    also writes them to <out>/../captions.jsonl (not with --measure)."""
    from adapt.data import Example
    from transformers import CLIPTokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from captions import captions_for, junk_pool

    cells = [json.loads(line) for line in Path(a.training_set).read_text().splitlines() if line.strip()]
    junk = junk_pool(CLIPTokenizer.from_pretrained(Path(a.init) / "tokenizer").get_vocab(), cells)
    rng = random.Random(a.seed)
    examples = [Example(Path(a.data) / c["style"] / c["file"], text) for c in cells for text in captions_for(c, rng, junk)]
    missing = [str(e.image) for e in examples if not e.image.is_file()]
    if missing:
        sys.exit(f"error: {len(missing)} training images missing, e.g. {missing[0]}; pass --data DIR")
    if not a.measure:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out).parent / "captions.jsonl").write_text(
            "".join(json.dumps({"image": f"{e.image.parent.name}/{e.image.name}", "caption": e.prompt}) + "\n" for e in examples))
    return examples


def train_config(a):
    """The TrainConfig: resumes from <out>/checkpoints if there are any (not with --fresh or --measure)."""
    from adapt.train_config import TrainConfig

    out = Path(a.out)
    resume = None if (a.fresh or a.measure) else ("latest" if (out / "checkpoints").is_dir() else None)
    return TrainConfig(
        steps=a.measure or a.steps, batch_size=a.batch_size, lr=a.lr, lr_scheduler="cosine",
        warmup_steps=a.warmup, weight_decay=1e-2, max_grad_norm=1.0, caption_dropout=a.caption_dropout, snr_gamma=a.snr_gamma,
        cache_latents=True, cache_text=False, mixed_precision="no", seed=a.seed,
        checkpoint_every=0 if a.measure else a.checkpoint_every,
        keep_checkpoints=1, resume=resume,
    )


def main(argv=None) -> None:
    a = parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    from adapt.methods.full import FullMethod
    from adapt.models import load_components
    from adapt.train import train

    examples = build_examples(a)
    out = Path(a.out)
    cfg = train_config(a)
    components = load_components(a.init)
    keys = ("steps", "batch_size", "grad_accum", "lr", "lr_scheduler", "warmup_steps", "optimizer", "weight_decay",
            "max_grad_norm", "mixed_precision", "gradient_checkpointing", "cache_latents", "cache_text", "caption_dropout",
            "seed", "checkpoint_every", "keep_checkpoints", "snr_gamma")
    recipe = {"method": "base-build", "images": len(examples), "resolution": components.resolution,
              "train": {k: getattr(cfg, k) for k in keys}}
    t0 = time.perf_counter()
    result = train(components, FullMethod(train_text_encoder=True), examples, cfg,
                   out if not a.measure else BUILD / "measure", resolution=components.resolution, recipe=recipe)
    wall = time.perf_counter() - t0
    last = result["losses"][-50:]
    stats = {"args": {k: v for k, v in vars(a).items() if k != "fresh"}, "steps_done": result["steps"],
             "train_seconds_this_run": round(result["seconds"], 1), "wall_seconds_this_run": round(wall, 1),
             "loss_mean_last_50": round(sum(last) / max(1, len(last)), 5)}
    print(json.dumps(stats, indent=1))
    if not a.measure:
        (out.parent / f"{out.name}_stats.json").write_text(json.dumps(stats, indent=1) + "\n")


if __name__ == "__main__":
    main()
