"""Assemble the initial (untrained UNet / text encoder) Stable-Diffusion pipeline folder.

Given the VAE trained by ``train_vae.py``, writes ``StableDiffusionPipeline(...).save_pretrained``
(float32 safetensors, ``safety_checker=None``, ``feature_extractor=None``,
``requires_safety_checker=False``) with:

* ``tokenizer``: the SD 1.x CLIP tokenizer (49,408 tokens) from ``adapt/data_files/clip-tokenizer``,
  loaded with ``CLIPTokenizer.from_pretrained(folder)`` (never ``vocab_file=``/``merges_file=``,
  which silently builds an empty vocab in transformers 5). transformers 5's ``save_pretrained``
  writes only ``tokenizer.json`` + ``tokenizer_config.json``, so the original ``vocab.json``,
  ``merges.txt`` and ``special_tokens_map.json`` are copied in as well (for slow tokenizers and
  older transformers); the saved copy is re-loaded and its vocabulary size and the ids of
  "a photo of a cat" (SD 1.5's) checked.
* ``text_encoder``: a freshly initialised (seeded) ``CLIPTextModel``: 4 layers, 4 heads,
  ``intermediate_size = 4 * hidden``, 77 positions, SD 1.x special-token ids.
* ``unet``: a freshly initialised (seeded) ``UNet2DConditionModel`` for 16x16x4 latents,
  ``block_out_channels=(64, 128, 192)``, ``CrossAttnDownBlock2D`` / ``CrossAttnUpBlock2D`` at every
  level (cross-attention at 16x16, 8x8 and 4x4 and in the mid block), ``cross_attention_dim`` =
  the text encoder's hidden size, 4 attention heads (``attention_head_dim=4`` in diffusers' legacy
  naming, where it means the number of heads).
* ``scheduler``: SD 1.5's noise schedule as a ``DDPMScheduler`` (1000 steps, scaled_linear
  0.00085 -> 0.012, ``clip_sample=False``, ``steps_offset=1``, epsilon prediction;
  ``set_alpha_to_one=False`` is kept in the config so DDIM/PNDM made ``from_config`` match SD 1.5).
* ``vae``: the trained ``AutoencoderKL`` (its ``scaling_factor`` comes from training).

Size limit: all weight files together must be <= ``--max-mb`` (80 MB = 80e6 bytes, float32).
With ``--text-hidden-size auto`` / ``--unet-layers-per-block auto`` (defaults) the first
configuration of this ladder whose predicted size (4 bytes per parameter) fits is used:
(UNet layers_per_block, text hidden) = (1, 128), (1, 96), (1, 80), (1, 64). The token embedding
(49,408 x hidden) dominates the text encoder, so its width is the main lever.
After saving, the weight files are measured on disk (and with ``du``) and the script fails if
the limit is exceeded.

Checks: the folder loads with ``StableDiffusionPipeline.from_pretrained(out,
torch_dtype=torch.float32)`` and a seeded 2-step 64x64 generation runs (noise, as nothing but
the VAE is trained yet); loading WITHOUT ``torch_dtype`` gives float32 for every component.
Results are written to ``<out>/../init_stats.json`` (``--stats``).

Usage (from the repo root)::

    PYTHONPATH=. python examples/build_base/init_pipeline.py \
        --vae outputs/base-build/vae --out outputs/base-build/init
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # pipeline_configs (already there when run as a script)
    sys.path.insert(0, str(HERE))

from adapt.fileio import atomic_dir  # noqa: E402
from pipeline_configs import BOS_ID, EOS_ID, SD15_SCHEDULER, VOCAB_SIZE, build_models, n_params  # noqa: E402

DEFAULT_TOKENIZER = REPO_ROOT / "adapt" / "data_files" / "clip-tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json")
REFERENCE_IDS = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])  # SD 1.5's ids
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
LADDER = [(1, 128), (1, 96), (1, 80), (1, 64)]


def weight_bytes(folder: Path) -> dict[str, int]:
    """Bytes of weight files per top-level sub-folder (component)."""
    sizes: dict[str, int] = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES):
            comp = p.relative_to(folder).parts[0]
            sizes[comp] = sizes.get(comp, 0) + p.stat().st_size
    return sizes


def du_bytes(paths: list[Path]) -> int | None:
    """Apparent size of ``paths`` according to ``du -cb`` (None if du is unavailable)."""
    if not paths or shutil.which("du") is None:
        return None
    res = subprocess.run(["du", "-cb", *map(str, paths)], capture_output=True, text=True, check=True)
    return int(res.stdout.strip().splitlines()[-1].split()[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vae", default=str(REPO_ROOT / "outputs" / "base-build" / "vae"),
                   help="trained AutoencoderKL folder (from train_vae.py)")
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    p.add_argument("--out", default=str(REPO_ROOT / "outputs" / "base-build" / "init"))
    p.add_argument("--stats", default=None, help="JSON report path (default <out>/../init_stats.json)")
    p.add_argument("--text-hidden-size", default="auto", help="int or 'auto' (see the ladder)")
    p.add_argument("--unet-layers-per-block", default="auto", help="1, 2 or 'auto'")
    p.add_argument("--max-mb", type=float, default=80.0, help="weight budget in MB (1e6 bytes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", default="an emoji of cat")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p.parse_args(argv)


def load_tokenizer(folder: str):
    """The CLIP tokenizer of ``folder``, checked for SD 1.x's vocabulary size and special-token ids."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(folder)
    if len(tokenizer) != VOCAB_SIZE:
        raise SystemExit(f"tokenizer at {folder} has {len(tokenizer)} tokens, not {VOCAB_SIZE}")
    if (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) != (BOS_ID, EOS_ID, EOS_ID):
        raise SystemExit("unexpected special-token ids in the tokenizer")
    return tokenizer


def load_vae(folder: str):
    """The trained VAE of ``folder`` (4 latent channels) and its latent size; returns (vae, latent_size)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).eval()
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = vae.config.sample_size // vae_factor
    if vae.config.latent_channels != 4:
        raise SystemExit("the UNet expects a 4-channel latent VAE")
    return vae, latent_size


def choose_config(args, vae_params: int, latent_size: int, budget: int):
    """The first (layers_per_block, text hidden) of the ladder (or the one asked for) whose predicted
    float32 size fits ``budget`` bytes; returns (layers_per_block, hidden, text_encoder, unet)."""
    if args.text_hidden_size == "auto" or args.unet_layers_per_block == "auto":
        ladder = [(l, h) for l, h in LADDER
                  if args.unet_layers_per_block in ("auto", str(l))
                  and args.text_hidden_size in ("auto", str(h))]
    else:
        ladder = [(int(args.unet_layers_per_block), int(args.text_hidden_size))]
    for lpb, hidden in ladder:
        text_encoder, unet = build_models(lpb, hidden, args.seed, latent_size)
        predicted = 4 * (n_params(text_encoder) + n_params(unet) + vae_params)
        print(f"candidate unet layers_per_block={lpb}, text hidden={hidden}: "
              f"unet {n_params(unet):,} + text {n_params(text_encoder):,} + vae {vae_params:,} params "
              f"-> ~{predicted / 1e6:.1f} MB", flush=True)
        if predicted <= budget:
            return lpb, hidden, text_encoder, unet
    raise SystemExit(f"no configuration fits {args.max_mb} MB")


def save_pipeline(pipe, out: Path, tokenizer_folder: str) -> None:
    """``pipe.save_pretrained`` plus the original tokenizer files, into a temp sibling swapped in at
    the end (``adapt.fileio.atomic_dir``), so an interrupted run never leaves half a folder."""
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_folder) / name
            if src.exists() and not (tmp / "tokenizer" / name).exists():
                shutil.copyfile(src, tmp / "tokenizer" / name)  # copyfile: not the read-only mode


def check_size(out: Path, max_mb: float, budget: int):
    """Prints the weight bytes per component; fails on non-safetensors weights or over ``budget``.
    Returns (bytes per component, total, ``du -cb`` total)."""
    sizes = weight_bytes(out)
    total = sum(sizes.values())
    files = [f for f in out.rglob("*") if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)]
    du_total = du_bytes(files)
    for comp, b in sorted(sizes.items()):
        print(f"  {comp:13s} {b / 1e6:6.2f} MB", flush=True)
    print(f"  weights total {total / 1e6:.2f} MB ({total:,} bytes; du -cb: {du_total if du_total is None else f'{du_total:,}'}), "
          f"limit {max_mb} MB", flush=True)
    if not all(f.suffix == ".safetensors" for f in files):
        raise SystemExit(f"non-safetensors weight files: {files}")
    if max(total, du_total or 0) > budget:
        raise SystemExit(f"weights {total / 1e6:.2f} MB exceed the {max_mb} MB limit")
    return sizes, total, du_total


def check_tokenizer(out: Path, tokenizer, prompt: str):
    """The saved tokenizer gives the original's ids (and SD 1.5's), also from vocab/merges alone."""
    from transformers import CLIPTokenizer

    saved_tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    assert len(saved_tok) == VOCAB_SIZE, f"saved tokenizer has {len(saved_tok)} tokens"
    ids = saved_tok(prompt).input_ids
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and len(ids) > 3, ids
    assert ids == tokenizer(prompt).input_ids
    assert saved_tok(REFERENCE_IDS[0]).input_ids == REFERENCE_IDS[1]
    slow_only = Path(tempfile.mkdtemp(prefix="clip-tok-"))
    try:  # the copied vocab/merges alone (no tokenizer.json) must give the same tokenizer
        for name in TOKENIZER_FILES + ("tokenizer_config.json",):
            shutil.copyfile(out / "tokenizer" / name, slow_only / name)
        tok2 = CLIPTokenizer.from_pretrained(slow_only)
        assert len(tok2) == VOCAB_SIZE and tok2(REFERENCE_IDS[0]).input_ids == REFERENCE_IDS[1]
    finally:
        shutil.rmtree(slow_only, ignore_errors=True)
    return saved_tok


def check_pipeline(out: Path, pipe, prompt: str, seed: int) -> dict[str, str]:
    """The saved pipeline reloads with the same weights and generates; without ``torch_dtype`` every
    component is float32. Returns the component dtypes of that plain load."""
    from diffusers import StableDiffusionPipeline

    loaded = StableDiffusionPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert loaded.safety_checker is None and loaded.feature_extractor is None
    assert type(loaded.scheduler).__name__ == "DDPMScheduler", type(loaded.scheduler)
    assert abs(loaded.vae.config.scaling_factor - pipe.vae.config.scaling_factor) < 1e-9
    for name in ("unet", "text_encoder", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), f"{name} weights changed on reload"
    g = torch.Generator().manual_seed(seed)
    res = loaded(prompt, num_inference_steps=2, height=64, width=64, generator=g,
                 guidance_scale=7.5, output_type="np")
    img = res.images
    assert img.shape == (1, 64, 64, 3) and bool((img >= 0).all() and (img <= 1).all()), img.shape
    print(f"2-step 64x64 generation ok: {img.shape}, mean {img.mean():.3f}", flush=True)

    plain = StableDiffusionPipeline.from_pretrained(out)  # no torch_dtype
    dtypes = {name: str(getattr(plain, name).dtype) for name in ("unet", "text_encoder", "vae")}
    param_dtypes = {name: sorted({str(t.dtype) for t in getattr(plain, name).state_dict().values()
                                  if t.is_floating_point()})
                    for name in ("unet", "text_encoder", "vae")}
    print(f"dtypes without torch_dtype: {dtypes} (all floating tensors: {param_dtypes})", flush=True)
    assert all(v == ["torch.float32"] for v in param_dtypes.values()), param_dtypes
    return dtypes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise SystemExit(f"{out} exists; pass --overwrite to replace it")
    budget = int(args.max_mb * 1e6)
    tokenizer = load_tokenizer(args.tokenizer)
    vae, latent_size = load_vae(args.vae)
    vae_params = n_params(vae)
    lpb, hidden, text_encoder, unet = choose_config(args, vae_params, latent_size, budget)

    scheduler = DDPMScheduler.from_config(SD15_SCHEDULER)
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    save_pipeline(pipe, out, args.tokenizer)
    sizes, total, du_total = check_size(out, args.max_mb, budget)
    saved_tok = check_tokenizer(out, tokenizer, args.prompt)
    dtypes = check_pipeline(out, pipe, args.prompt, args.seed)

    stats = {
        "out": str(out),
        "unet_layers_per_block": lpb,
        "text_hidden_size": hidden,
        "params": {"unet": n_params(unet), "text_encoder": n_params(text_encoder), "vae": vae_params},
        "weight_mb": {k: round(v / 1e6, 3) for k, v in sorted(sizes.items())},
        "weight_mb_total": round(total / 1e6, 3),
        "weight_bytes_total_du": du_total,
        "limit_mb": args.max_mb,
        "vae_scaling_factor": vae.config.scaling_factor,
        "latent_size": latent_size,
        "tokenizer_vocab": len(saved_tok),
        "dtypes_without_torch_dtype": dtypes,
        "seed": args.seed,
    }
    stats_path = Path(args.stats) if args.stats else out.parent / "init_stats.json"
    stats_path.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
