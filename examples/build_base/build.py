"""Build the bundled emoji base model from scratch: every stage, seeded, resumable.

    python examples/build_base/build.py --data ../shared/data/emoji        # ~3 h on 2 CPU cores

Stages (each skipped when its output exists, so a killed build continues where it stopped):
  1. select_emoji.py   -> training_set.jsonl + heldout.jsonl: (emoji, style) cells of "Animals &
                          Nature", "Food & Drink" and the 12 cats in the five non-Twemoji
                          styles; 6% of the cells held out by a fixed seed
  2. train_vae.py      -> vae/: a small AutoencoderKL (4 latent channels, 64 px -> 16x16 latents),
                          trained on every image of the five styles but the held-out cells
                          (32 px crops, then whole images; time-capped); PSNR on Twemoji
  3. init_pipeline.py  -> init/: the diffusers pipeline with the trained VAE, the real CLIP
                          tokenizer, a fresh 4-layer CLIPTextModel and a UNet with cross-attention
                          at every level, SD 1.5's noise schedule
  4. train_base.py     -> base/: UNet + text encoder trained together on adapt's one training loop
                          (FullMethod(train_text_encoder=True)), captions from captions.py
  4b. train_base.py    -> refined/, --refine-steps N (default 4000, as shipped; 0 skips it): stage 4
                          again for N steps from base/'s model, with a cosine schedule of its own from
                          --refine-lr (5e-4) and seed 1 (other captions, order and noise); packaged
                          instead of base/. README "The bundled base model" has what it changed
  5. package           -> adapt/base/: the pipeline folder + training_set.jsonl + heldout.jsonl +
                          adapt.json + README (licences); no build-machine paths in the configs

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
sys.path.insert(0, str(HERE))
from captions import STYLE_PHRASES, TEMPLATE  # noqa: E402

README = """# The bundled emoji base model

A small text-to-image model in the standard diffusers `StableDiffusionPipeline` layout, built by
`examples/build_base/build.py` from real artwork so that `adapt` has a real (if tiny) pretrained
base that runs offline on a laptop CPU: 64x64 images, 16x16x4 latents.

- VAE: `AutoencoderKL`, 4 latent channels ({vae_params:,} parameters), trained on the five styles below;
  reconstruction PSNR {psnr_train} dB on them and {psnr_twemoji} dB on Twemoji, a style it never saw.
- Text encoder: a {layers}-layer `CLIPTextModel` (hidden {hidden}) with the real CLIP tokenizer of SD 1.x (49,408 tokens).
- UNet: `UNet2DConditionModel` with cross-attention at every resolution level ({unet_params:,} parameters).
- Noise schedule: SD 1.5's (scaled_linear 0.00085 -> 0.012, 1,000 steps, epsilon prediction).
- Training: UNet and text encoder together on adapt's loop; `recipe.json` holds the settings{recipe_parts}.

## What it was trained on

{n_emoji} emoji ("Animals & Nature", "Food & Drink", and the 12 cat emoji) in
five styles, {n_train:,} (emoji, style) cells in `training_set.jsonl`. {n_held} cells (6%, fixed seed) are held
out in `heldout.jsonl`: each is an emoji the model knows, in a style it knows, never seen together.
**Twemoji is not in it at all**: it is the style and subject that `examples/cat` teaches.

Captions (see `examples/build_base/captions.py`), four per cell:

- `an emoji of {{name}}` with the Unicode name, always;
- 30%: one to three CLDR keywords, e.g. `an emoji of cat face, kitten, pet`;
- 60%: a style phrase: {styles}; without one the model samples across the styles;
- 50%: one or two words no caption otherwise uses (random CLIP-vocabulary words, 30% of them written
  `<word>`), anywhere, so an unknown word such as `sks` or `<sks>` changes nothing; `sks`, `twemoji`, `twitter` and `tweet` are never used;
- 10% of the time the caption is empty (classifier-free guidance).

`adapt.json` lists the style phrases and the settings this model recommends for each method.

## Sources and licences

- Noto Emoji images: Google, Apache License 2.0 (font: SIL Open Font License 1.1),
  <https://github.com/googlefonts/noto-emoji>.
- OpenMoji: HfG Schwäbisch Gmünd and contributors, CC BY-SA 4.0, <https://openmoji.org>.
- Fluent Emoji (flat, color/gradient, high-contrast line art): Microsoft, MIT,
  <https://github.com/microsoft/fluentui-emoji>.
- Twemoji images (used by `examples/cat` and for evaluation, not for training this model):
  Twitter, Inc. and other contributors, CC-BY 4.0, <https://github.com/twitter/twemoji>.
- Emoji names: Unicode CLDR via the `emoji-datasource` npm package (MIT); keywords: CLDR
  annotations via OpenMoji's data.
- CLIP tokenizer: OpenAI CLIP (MIT).
"""


# Settings this model recommends (adapt reads them from adapt.json; recipes and flags override).
# Tuned on examples/cat with benchmarks/learning.py (see the README's figures).
ADAPT_DEFAULTS = {
    "_note": "Settings this small 64 px model recommends (see README.md); recipes and flags override them.",
    "guidance": 3.0,
    "styles": STYLE_PHRASES,
    # measured on the shipped (refined) base; README "The bundled base model" has the probes
    "lora": {"lr": 0.004, "steps": 750},  # quickstart 1.000 Twemoji cats (0.750 at 500 steps, 0.625 at 2e-3, 0.375 at 8e-3)
    # class images at guidance 3, training seeds 0-2, prior weight 0.1: 0.938 / 0.688 / 0.438 Twemoji cats, class drift
    # 0.62 / 0.47 / 0.86 of no prior's (0.2: 0.875 / 0.250 / 0.375; 0.3: 0.500 / 0.125 at seeds 0-1; at guidance-7.5
    # class images 0.3 drew 0.812, drift 0.765, and 1.0 x 300 0.000)
    "dreambooth": {"lr": 0.0001, "steps": 300, "prior_loss_weight": 0.1},
    # `dreambooth --lora`, training seeds 0-2: 0.60 Twemoji cats, class drift 0.89 of no prior's (the generic 1e-4 x 500
    # at prior weight 1.0: 0.000; weight 0.3: 0.40, 0.80; 0.1: 0.56, 0.94; 0.3 x 400 steps: 0.31, 0.69)
    "dreambooth-lora": {"lr": 0.004, "steps": 300, "prior_loss_weight": 0.2},
    "textual-inversion": {"lr": 0.005, "steps": 600},  # 0.062 (300 steps: 0.000; 1e-2 x 300 and 2e-3 x 600: 0.000)
}


def stage(name: str, done: bool, cmd: list[str]) -> None:
    if done:
        print(f"[build] {name}: done already, skipped")
        return
    print(f"[build] {name}: {' '.join(cmd)}", flush=True)
    subprocess.run([sys.executable, *cmd], check=True, cwd=REPO)


def strip_build_paths(folder: Path) -> None:
    """Drop `_name_or_path` (the build machine's folder) from every shipped config."""
    for f in folder.rglob("*.json"):
        cfg = json.loads(f.read_text())
        if isinstance(cfg, dict) and "_name_or_path" in cfg:
            del cfg["_name_or_path"]
            f.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def package(out: Path, dest: Path, trained: str = "base") -> None:
    import math

    from safetensors import safe_open

    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out / trained, dest, ignore=shutil.ignore_patterns("checkpoints", "metrics.jsonl", "loss.png", "report.md", "logs"))
    for name in ("training_set.jsonl", "heldout.jsonl"):  # with each cell's canonical prompt, for `adapt eval --prompts`
        cells = [json.loads(line) for line in (out / name).read_text().splitlines() if line.strip()]
        (dest / name).write_text("".join(json.dumps({**c, "caption": f"{TEMPLATE.format(c['name'])}, {STYLE_PHRASES[c['style']]}"},
                                                    ensure_ascii=False) + "\n" for c in cells))
    if trained != "base":  # the shipped recipe.json: both runs' settings, stage 4's and then 4b's
        (dest / "recipe.json").write_text(json.dumps({name: json.loads((out / name / "recipe.json").read_text())
                                                      for name in ("base", trained)}, indent=2) + "\n")
    strip_build_paths(dest)
    sys.path.insert(0, str(REPO))
    from adapt.formats import standard_clip_keys

    standard_clip_keys(dest / "text_encoder")  # `text_model.` keys, which transformers 4.x and 5.x both load
    (dest / "adapt.json").write_text(json.dumps(ADAPT_DEFAULTS, indent=2) + "\n")
    te = json.loads((dest / "text_encoder" / "config.json").read_text())
    vae_stats = json.loads((out / "vae_stats.json").read_text())
    with safe_open(str(dest / "unet" / "diffusion_pytorch_model.safetensors"), "np") as f:
        unet = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    train = [json.loads(line) for line in (out / "training_set.jsonl").read_text().splitlines()]
    held = (out / "heldout.jsonl").read_text().splitlines()
    styles = ", ".join(f"`{v}` ({k})" for k, v in STYLE_PHRASES.items())
    (dest / "README.md").write_text(README.format(
        hidden=te["hidden_size"], layers=te["num_hidden_layers"], unet_params=unet, vae_params=vae_stats["parameters"],
        psnr_train=vae_stats["psnr_training_styles_db"], psnr_twemoji=vae_stats["psnr_twemoji_db"],
        n_emoji=len({c["file"] for c in train}), n_train=len(train), n_held=len(held), styles=styles,
        recipe_parts="" if trained == "base" else " (`base`: stage 4's run, `refined`: stage 4b's, which trained on from it)"))
    size = sum(p.stat().st_size for p in dest.rglob("*.safetensors"))
    print(f"[build] packaged {dest} ({size / 1e6:.1f} MB of weights)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "emoji"), help="emoji folder (style folders, metadata.jsonl)")
    p.add_argument("--out", default=str(REPO / "outputs" / "base-build"))
    p.add_argument("--dest", default=str(REPO / "adapt" / "base"), help="where the finished model goes (package data)")
    p.add_argument("--threads", default="2")
    p.add_argument("--vae-seconds", default="1800", help="wall-clock cap of the VAE's training loop")
    p.add_argument("--unet-steps", default="4800")
    p.add_argument("--refine-steps", type=int, default=4000, help="stage 4b: train on from stage 4's model for this many steps "
                   "(0: ship stage 4's model)")
    p.add_argument("--refine-lr", default="5e-4", help="stage 4b's peak learning rate (cosine to 0, 50 warm-up steps)")
    p.add_argument("--vae", default=None, help="reuse this trained VAE folder (re-measured) instead of training one "
                   "(e.g. adapt/base/vae: its held-out cells contain this build's)")
    a = p.parse_args()
    data, out = Path(a.data), Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    styles = ",".join(str(data / s) for s in STYLE_PHRASES)
    stage("1 select", (out / "training_set.jsonl").is_file(), [str(HERE / "select_emoji.py"), "--data", str(data), "--out", str(out)])
    stage("2 vae", (out / "vae" / "diffusion_pytorch_model.safetensors").is_file(),
          [str(HERE / "train_vae.py"), "--images", styles, "--exclude", str(out / "heldout.jsonl"),
           "--heldout-images", str(data / "twemoji"), "--out", str(out), "--threads", a.threads,
           "--steps", "100000", "--max-train-seconds", a.vae_seconds, "--batch-size", "16", "--ckpt-every", "500",
           *(["--reuse", str(Path(a.vae).resolve())] if a.vae else [])])
    stage("3 init", (out / "init" / "model_index.json").is_file(),
          [str(HERE / "init_pipeline.py"), "--vae", str(out / "vae"), "--out", str(out / "init"), "--threads", a.threads])
    def train_stage(name: str, init: str, trained: str, steps: str, *more: str) -> None:  # stages 4 and 4b
        stage(name, (out / trained / "recipe.json").is_file(),
              [str(HERE / "train_base.py"), "--data", str(data), "--training-set", str(out / "training_set.jsonl"),
               "--init", str(out / init), "--out", str(out / trained), "--threads", a.threads, "--steps", steps, *more])

    train_stage("4 unet + text encoder", "init", "base", a.unet_steps)
    refine = a.refine_steps > 0
    if refine:
        train_stage("4b refine", "base", "refined", str(a.refine_steps), "--lr", a.refine_lr, "--warmup", "50", "--seed", "1")
    package(out, Path(a.dest), "refined" if refine else "base")


if __name__ == "__main__":
    main()
