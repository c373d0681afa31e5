"""Build the bundled emoji base model from scratch: every stage, seeded, resumable.

    python examples/build_base/build.py --data ../shared/data/emoji        # ~1 hour on 2 CPU cores

Stages (each skipped when its output exists, so a killed build continues where it stopped):
  1. select_emoji.py   -> training_set.jsonl: "Animals & Nature" + "Food & Drink" + all 12 cat emoji
  2. train_vae.py      -> vae/: a small AutoencoderKL (4 latent channels, 64 px -> 16x16 latents),
                          trained on all 1,629 Noto emoji with its own short loop (time-capped)
  3. init_pipeline.py  -> init/: the diffusers pipeline with the trained VAE, the real CLIP
                          tokenizer, a fresh small CLIPTextModel and UNet, SD 1.5's noise schedule
  4. train_base.py     -> base/: UNet + text encoder trained together on adapt's one training loop
                          (FullMethod(train_text_encoder=True)), 10% empty captions, checkpoints
  5. package           -> adapt/base/: the pipeline folder + training_set.jsonl + README (licences)

Run from the repository root. --out is the work folder (default outputs/base-build).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

README = """# The bundled emoji base model

A small text-to-image model in the standard diffusers `StableDiffusionPipeline` layout, built by
`examples/build_base/build.py` from real artwork so that `adapt` has a real (if tiny) pretrained
base that runs offline on a laptop CPU: 64x64 images, 16x16x4 latents.

- VAE: `AutoencoderKL`, 4 latent channels, trained on all 1,629 Noto emoji.
- Text encoder: a 2-layer `CLIPTextModel` (hidden {hidden}) with the real CLIP tokenizer of SD 1.x (49,408 tokens).
- UNet: `UNet2DConditionModel` with cross-attention ({unet_params:,} parameters).
- Noise schedule: SD 1.5's (scaled_linear 0.00085 -> 0.012, 1,000 steps, epsilon prediction).
- Training data: the {n} emoji in `training_set.jsonl` (Noto drawings, "Animals & Nature", "Food & Drink"
  and all 12 cat emoji), captioned `an emoji of {{name}}` with the Unicode name, 10% empty captions.

## Sources and licences

- Noto Emoji images: Google, Apache License 2.0 (font: SIL Open Font License 1.1),
  <https://github.com/googlefonts/noto-emoji>.
- Twemoji images (used by `examples/cat` and for evaluation, not for training this model):
  Twitter, Inc. and other contributors, CC-BY 4.0, <https://github.com/twitter/twemoji>.
- Emoji names: Unicode CLDR via the `emoji-datasource` npm package (MIT).
- CLIP tokenizer: OpenAI CLIP (MIT).
"""


# Settings this model recommends (adapt reads them from adapt.json; recipes and flags override).
# Measured on examples/cat: with SD 1.5's usual lr 1e-4 / guidance 7.5 a LoRA barely moves this
# tiny model; 3e-4 for 1000 steps and guidance 3 move it clearly toward the training images.
ADAPT_DEFAULTS = {
    "_note": "Settings this small 64 px model recommends (see README.md); recipes and flags override them.",
    "guidance": 3.0,
    "lora": {"lr": 0.0003, "steps": 1000},
    "dreambooth": {"lr": 0.0001, "steps": 200},
    "textual-inversion": {"lr": 0.005, "steps": 300},
}


def stage(name: str, done: bool, cmd: list[str]) -> None:
    if done:
        print(f"[build] {name}: done already, skipped")
        return
    print(f"[build] {name}: {' '.join(cmd)}", flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=REPO)


def package(base: Path, training_set: Path, dest: Path) -> None:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(base, dest, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "loss.png", "report.md"))
    shutil.copy2(training_set, dest / "training_set.jsonl")
    (dest / "adapt.json").write_text(json.dumps(ADAPT_DEFAULTS, indent=2) + "\n")
    import math

    from safetensors import safe_open

    te = json.loads((dest / "text_encoder" / "config.json").read_text())
    with safe_open(str(dest / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        unet = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    n = len(training_set.read_text().splitlines())
    (dest / "README.md").write_text(README.format(hidden=te["hidden_size"], unet_params=unet, n=n))
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"[build] packaged {dest} ({size / 1e6:.1f} MB)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "emoji"), help="emoji folder (noto/, twemoji/, metadata.jsonl)")
    p.add_argument("--out", default=str(REPO / "outputs" / "base-build"))
    p.add_argument("--dest", default=str(REPO / "adapt" / "base"), help="where the finished model goes (package data)")
    p.add_argument("--threads", default="2")
    p.add_argument("--unet-steps", default="4000")
    a = p.parse_args()
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ts = out / "training_set.jsonl"
    stage("1 select", ts.is_file(), [str(HERE / "select_emoji.py"), "--metadata", str(data / "metadata.jsonl"),
                                      "--images", str(data / "noto"), "--out", str(ts)])
    stage("2 vae", (out / "vae" / "diffusion_pytorch_model.safetensors").is_file(),
          [str(HERE / "train_vae.py"), "--images", str(data / "noto"), "--heldout-images", str(data / "twemoji"),
           "--out", str(out), "--threads", a.threads])
    stage("3 init", (out / "init" / "model_index.json").is_file(),
          [str(HERE / "init_pipeline.py"), "--vae", str(out / "vae"), "--out", str(out / "init"), "--threads", a.threads])
    stage("4 unet + text encoder", (out / "base" / "recipe.json").is_file(),
          [str(HERE / "train_base.py"), "--images", str(data / "noto"), "--training-set", str(ts), "--init", str(out / "init"),
           "--out", str(out / "base"), "--threads", a.threads, "--steps", a.unet_steps])
    package(out / "base", ts, Path(a.dest))


if __name__ == "__main__":
    main()
