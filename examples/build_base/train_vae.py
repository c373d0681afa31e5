"""Train a small diffusers ``AutoencoderKL`` on the Noto emoji (64x64 RGB -> 16x16x4 latents).

This is the first stage of building a small pretrained text-to-image base model: an SD-style
KL autoencoder, trained from scratch with a short, self-contained loop.

* Model: ``AutoencoderKL`` with 3 levels (``DownEncoderBlock2D`` x3 / ``UpDecoderBlock2D`` x3),
  ``layers_per_block=1``, ``block_out_channels=(32, 64, 64)`` (about 0.95M parameters),
  ``latent_channels=4``: two downsamples, so 64x64 pixels become 16x16x4 latents (factor 4).
* Data: ALL images of ``--images`` (1,629 Noto emoji), composited on white with
  ``adapt.images.load_rgb``, scaled to [-1, 1]; random horizontal flips.
* Loss: MSE between the input and the decode of a latent *sampled* from the posterior, plus
  ``--kl-weight`` (1e-6, as in SD's autoencoder) times the mean per-sample KL to N(0, I).
* Optimiser: AdamW, linear warmup then cosine decay, batch ``--batch-size``. The cosine runs over
  a progress fraction ``max(step / --steps, train_seconds / --max-train-seconds)``: on an idle
  machine the run takes ``--steps`` steps; if the (shared, 2-core) machine is slower than expected
  the schedule is compressed in time and training ends on time with the learning rate decayed, so
  the wall-clock budget holds either way (``steps`` in the stats is the number actually taken).
* Checkpoints every ``--ckpt-every`` steps to ``<out>/checkpoints/ckpt.pt`` (written to a temp
  name, then ``os.replace``); re-running the same command resumes from it, so the script can be
  started in the background with ``nohup`` and restarted after an interruption. The data order
  is a function of (seed, epoch) and the RNG state and trained seconds are saved, so a resumed
  run continues the same data order and schedule position.
* After training: the std of the posterior means over the whole training set gives
  ``scaling_factor = 1 / std`` (SD's 0.18215 is the same statistic), written into the VAE config;
  the model is saved with ``save_pretrained(<out>/vae)`` (safetensors), and ``<out>/vae_stats.json``
  records parameter count, steps, wall time, reconstruction PSNR (posterior mean, images in
  [0, 1]) on the Noto images (training style) and on the Twemoji versions of the same files
  (held-out style), and the scaling factor. A reconstruction grid (noto, recon, twemoji, recon)
  is written to ``<out>/vae_recon.png``.

``--measure N`` only times N training steps (no checkpoint, no output) so ``--steps`` can be
chosen from the measured step time.

Usage (from the repo root)::

    PYTHONPATH=. python examples/build_base/train_vae.py --measure 5
    PYTHONPATH=. nohup python examples/build_base/train_vae.py --steps 700 --max-train-seconds 720 \
        --out outputs/base-build > outputs/base-build/vae.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:  # make `adapt` importable without PYTHONPATH
    sys.path.insert(0, str(REPO_ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # vae_utils (already there when run as a script)
    sys.path.insert(0, str(HERE))

from adapt.fileio import atomic_path  # noqa: E402
from adapt.images import make_grid, save_image  # noqa: E402
from vae_utils import (  # noqa: E402
    batch_indices, build_vae, encode_decode, load_checkpoint, load_folder, load_folders, lr_factor,
    progress, psnr, save_checkpoint, to_pil, vae_loss,
)

DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "emoji"
CKPT_NAME = "ckpt.pt"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=",".join(str(DEFAULT_DATA / s) for s in
                                                  ("noto", "openmoji", "fluent-flat", "fluent-modern", "fluent-line")),
                   help="comma-separated training image folders (one per style)")
    p.add_argument("--exclude", default=None, help="heldout.jsonl: (style, file) cells left out of training")
    p.add_argument("--heldout-images", default=str(DEFAULT_DATA / "twemoji"),
                   help="a style never trained on, for held-out-style PSNR")
    p.add_argument("--crop", type=int, default=32, help="train on random crops of this size (0 = whole images)...")
    p.add_argument("--full-from", type=float, default=0.8, help="...until this fraction of training, then whole images")
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "base-build"),
                   help="writes <out>/vae, <out>/vae_stats.json, <out>/checkpoints")
    p.add_argument("--steps", type=int, default=700,
                   help="planned steps (~1 s/step with 2 threads on an idle 2-core machine)")
    p.add_argument("--max-train-seconds", type=float, default=720,
                   help="wall-clock cap on the training loop (0 = none); see the schedule note")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--kl-weight", type=float, default=1e-6)
    p.add_argument("--block-out-channels", default="32,64,64")
    p.add_argument("--norm-num-groups", type=int, default=32)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--measure", type=int, default=0,
                   help="only time this many training steps, write nothing, and exit")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--reuse", default=None, help="a trained VAE folder: skip training, re-measure and export it "
                        "(its scaling factor kept)")
    p.add_argument("--eval-images", type=int, default=1500,
                   help="use only N images (a seeded random sample) for the scaling factor and PSNR "
                        "(0 = all; a smaller number is for quick smoke tests)")
    return p.parse_args(argv)


def load_training_images(args, t_start: float) -> torch.Tensor:
    """The images of the ``--images`` folders minus the ``--exclude`` cells, in [-1, 1]."""
    exclude = set()
    if args.exclude:
        exclude = {(r["style"], r["file"]) for r in map(json.loads, Path(args.exclude).read_text().splitlines()) if r}
    x_all, _ = load_folders(args.images.split(","), exclude)
    print(f"loaded {len(x_all)} training images from {args.images} in {time.time() - t_start:.1f}s",
          flush=True)
    if len(x_all) < args.batch_size:
        raise SystemExit(f"need at least --batch-size={args.batch_size} images")
    return x_all


def build_model(args, boc: tuple[int, ...], sample_size: int):
    """A fresh VAE (or the ``--reuse`` one, which sets --steps and --max-train-seconds to 0) and its
    optimiser; returns (vae, optimiser, parameter count)."""
    vae = build_vae(boc, args.norm_num_groups, sample_size=sample_size)
    if args.reuse:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(args.reuse)
        args.steps = args.max_train_seconds = 0
    n_params = sum(p.numel() for p in vae.parameters())
    print(f"AutoencoderKL block_out_channels={boc}: {n_params:,} parameters", flush=True)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            betas=(0.9, 0.99))
    return vae, opt, n_params


def training_batch(x_all: torch.Tensor, args, step: int, prog: float) -> torch.Tensor:
    """The images of ``step``'s batch: randomly cropped until ``--full-from``, randomly flipped."""
    idx = batch_indices(len(x_all), args.batch_size, step, args.seed)
    x = x_all[idx]
    if args.crop and prog < args.full_from:  # crops: 4x cheaper steps, the convolutions see the same edges
        g = torch.Generator().manual_seed(args.seed * 7919 + step)
        top, left = (int(v) for v in torch.randint(0, x.shape[-1] - args.crop + 1, (2,), generator=g))
        x = x[..., top:top + args.crop, left:left + args.crop]
    if not args.no_flip:
        flip = torch.rand(len(x)) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def train(vae, opt, x_all: torch.Tensor, args, ckpt_path: Path, step: int, elapsed_before: float) -> tuple[int, float]:
    """The training loop, from ``step`` with ``elapsed_before`` seconds already trained; checkpoints
    every ``--ckpt-every`` steps and at the end (not with --measure). Returns (step, seconds trained)."""
    total = args.measure or args.steps
    vae.train()
    t_loop = time.time()
    run_mse = run_kl = 0.0
    n_run = 0
    while not args.reuse:
        seconds = elapsed_before + time.time() - t_loop
        prog = progress(step, total, seconds, 0 if args.measure else args.max_train_seconds)
        if prog >= 1.0:
            break
        lr = args.lr * lr_factor(step, prog, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        x = training_batch(x_all, args, step, prog)
        loss, mse, kl = vae_loss(vae, x, args.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        run_mse += mse.item()
        run_kl += kl.item()
        n_run += 1
        if args.measure:
            dt = time.time() - t_loop
            print(f"step {step}: loss {loss.item():.4f}  {dt / step:.2f}s/step avg", flush=True)
            continue
        if step % args.log_every == 0:
            dt = elapsed_before + time.time() - t_loop
            m = run_mse / n_run
            print(f"step {step}/{total}  mse {m:.5f} (~{10 * math.log10(4 / m):.1f} dB)  "
                  f"kl {run_kl / n_run:.1f}  lr {lr:.2e}  {dt:.0f}s ({dt / step:.2f}s/step)", flush=True)
            run_mse = run_kl = 0.0
            n_run = 0
        if step % args.ckpt_every == 0:
            save_checkpoint(ckpt_path, vae, opt, step, elapsed_before + time.time() - t_loop, args)
    if step % args.ckpt_every and not args.reuse and not args.measure:
        # final state, so a re-run after a crash during export skips training
        save_checkpoint(ckpt_path, vae, opt, step, elapsed_before + time.time() - t_loop, args)
    return step, elapsed_before + time.time() - t_loop


def evaluate(vae, x_all: torch.Tensor, args) -> dict:
    """Sets ``scaling_factor = 1 / std`` of the posterior means (kept with --reuse) in the VAE config;
    returns the eval and held-out images, their reconstructions, latent statistics and PSNRs."""
    vae.eval()
    n_eval = min(len(x_all), args.eval_images or len(x_all))
    pick_eval = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.seed))[:n_eval]
    x_eval = x_all[pick_eval]
    means, rec = encode_decode(vae, x_eval)
    std = float(means.std())
    scaling_factor = vae.config.scaling_factor if args.reuse else 1.0 / std
    vae.register_to_config(scaling_factor=scaling_factor)
    psnr_noto, psnr_noto_pooled = psnr(rec, x_eval)
    x_held, _ = load_folder(args.heldout_images)
    _, rec_held = encode_decode(vae, x_held)
    psnr_held, psnr_held_pooled = psnr(rec_held, x_held)
    return dict(n_eval=n_eval, x_eval=x_eval, rec=rec, x_held=x_held, rec_held=rec_held, means=means, std=std,
                scaling_factor=scaling_factor, psnr_noto=psnr_noto, psnr_noto_pooled=psnr_noto_pooled,
                psnr_held=psnr_held, psnr_held_pooled=psnr_held_pooled)


def export(vae, out: Path, ev: dict, seed: int) -> Path:
    """Saves the VAE to <out>/vae and the reconstruction grid to <out>/vae_recon.png; returns <out>/vae."""
    vae_dir = out / "vae"
    vae.save_pretrained(vae_dir, safe_serialization=True)
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(min(ev["n_eval"], len(ev["x_held"])), generator=g)[:16]
    tiles = []
    for i in pick.tolist():
        tiles += [to_pil(ev["x_eval"][i]), to_pil(ev["rec"][i]), to_pil(ev["x_held"][i]), to_pil(ev["rec_held"][i])]
    save_image(make_grid(tiles, cols=8), out / "vae_recon.png")
    # adapt.images.save_image and diffusers' save_pretrained write via mkstemp (mode 0600)
    for f in [out / "vae_recon.png", *vae_dir.iterdir()]:
        os.chmod(f, 0o644)
    return vae_dir


def vae_stats(args, ev: dict, n_params: int, boc: tuple[int, ...], step: int, train_seconds: float,
              n_train: int, t_eval: float, t_start: float) -> dict:
    """The contents of <out>/vae_stats.json."""
    return {
        "parameters": n_params,
        "block_out_channels": list(boc),
        "steps": step,
        "planned_steps": args.steps,
        "max_train_seconds": args.max_train_seconds,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "kl_weight": args.kl_weight,
        "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.time() - t_eval, 1),
        "wall_seconds_this_run": round(time.time() - t_start, 1),
        "psnr_training_styles_db": round(ev["psnr_noto"], 2),
        "psnr_training_styles_pooled_db": round(ev["psnr_noto_pooled"], 2),
        "psnr_twemoji_db": round(ev["psnr_held"], 2),
        "psnr_twemoji_pooled_db": round(ev["psnr_held_pooled"], 2),
        "latent_mean_std": round(ev["std"], 5),
        "latent_mean_mean": round(float(ev["means"].mean()), 5),
        "scaling_factor": round(ev["scaling_factor"], 5),
        "latent_shape": list(ev["means"].shape[1:]),
        "n_train_images": n_train,
        "n_eval_images": ev["n_eval"],
        "seed": args.seed,
        "threads": args.threads,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    t_start = time.time()

    out = Path(args.out)
    ckpt_path = out / "checkpoints" / CKPT_NAME
    boc = tuple(int(c) for c in args.block_out_channels.split(","))
    x_all = load_training_images(args, t_start)
    vae, opt, n_params = build_model(args, boc, x_all.shape[-1])

    step, elapsed_before = 0, 0.0
    if ckpt_path.exists() and not args.fresh and not args.measure and not args.reuse:
        step, elapsed_before = load_checkpoint(ckpt_path, vae, opt, args)
    step, train_seconds = train(vae, opt, x_all, args, ckpt_path, step, elapsed_before)
    if args.measure:
        print(f"measured {step} steps in {train_seconds:.1f}s", flush=True)
        return
    print(f"training done: {step} steps in {train_seconds:.0f}s", flush=True)

    # ---- evaluation, scaling factor, export ----
    t_eval = time.time()
    ev = evaluate(vae, x_all, args)
    vae_dir = export(vae, out, ev, args.seed)
    stats = vae_stats(args, ev, n_params, boc, step, train_seconds, len(x_all), t_eval, t_start)
    with atomic_path(out / "vae_stats.json") as tmp:
        tmp.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2), flush=True)
    print(f"saved {vae_dir} and {out / 'vae_stats.json'}", flush=True)


if __name__ == "__main__":
    main()
