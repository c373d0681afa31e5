"""Time per class image: adapt's class-image generation vs the reference script's loop (issue 16, item 5).

The model is the SD 1.5 architecture with random weights (adapt.models.SD15_*, nothing
downloaded) and SD 1.5's own scheduler, PNDM (skip_prk_steps, as its scheduler_config.json). Each
measurement runs in its own process and times the rendering loop only (pipeline loading excluded),
divided by the number of images; PNG/JPEG writing is inside for both.

* reference: what diffusers' examples/dreambooth/train_dreambooth.py does when it generates class
  images at its defaults (huggingface/diffusers, main(), "Generate class images if prior
  preservation is enabled"; read at commit 000280f56a6a81e355313e77ec831575ad571d8b):
  DiffusionPipeline.from_pretrained(model, torch_dtype=fp32 on CPU (prior_generation_precision
  unset), safety_checker=None), progress bar off, a DataLoader of PromptDataset(class_prompt, n)
  with batch_size=sample_batch_size=4, `pipeline(example["prompt"]).images` (its defaults:
  num_inference_steps=50, guidance 7.5, the model's scheduler), each image saved as
  f"{index}-{sha1}.jpg". One change so it runs on a CPU: the call also gets height/width =
  --resolution and num_inference_steps = 50 x --steps-scale (both its defaults at 512 and 1).
* adapt rows: adapt.classimages.ensure_class_images (batch 8), with
  - equal-b4: the reference's scheduler (pndm) and steps, batch 4: the same work, adapt's loop;
  - equal: the reference's scheduler and steps, adapt's batch 8: what batching gives;
  - defaults: DreamBoothConfig's class_scheduler and class_steps (x --steps-scale), fp32 (a run
    without --mixed-precision, on CPU);
  - bf16: the defaults in a --mixed-precision bf16 run.

Small resolutions exaggerate what batching gains on a CPU (per-operation overhead weighs more in
small tensors); the equal / equal-b4 rows show that part apart. Run it idle to quote it:

    python benchmarks/classimages.py                                   # 64 px, steps x 0.2, 8 images, 2 rounds
    python benchmarks/classimages.py --resolution 512 --steps-scale 1  # the real defaults (slow on CPU)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPT = "a photo of dog"
ROWS = ("reference", "equal-b4", "equal", "defaults", "bf16")
PNDM_SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)  # SD 1.5's scheduler_config.json


def build_model(folder: Path) -> Path:
    """SD 1.5's UNet, VAE and CLIP-L text encoder from their configs (random weights), with PNDM."""
    from diffusers import PNDMScheduler

    from adapt.models import SD15_TEXT, SD15_UNET, SD15_VAE, build_pipeline_folder

    build_pipeline_folder(folder, SD15_UNET, SD15_VAE, SD15_TEXT)
    PNDMScheduler(**PNDM_SD15).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return folder


def reference(model: Path, n: int, resolution: int, steps: int, out: Path) -> tuple[float, float]:
    """train_dreambooth.py's class-image loop (see the module docstring); (wall, CPU) seconds per image."""
    import torch
    from diffusers import DiffusionPipeline
    from torch.utils.data import DataLoader, Dataset

    class PromptDataset(Dataset):  # as the reference script's
        def __init__(self, prompt, num_samples):
            self.prompt, self.num_samples = prompt, num_samples

        def __len__(self):
            return self.num_samples

        def __getitem__(self, index):
            return {"prompt": self.prompt, "index": index}

    pipeline = DiffusionPipeline.from_pretrained(model, torch_dtype=torch.float32, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    sample_dataloader = DataLoader(PromptDataset(PROMPT, n), batch_size=4)
    pipeline.to("cpu")
    start, cpu = time.perf_counter(), time.process_time()
    for example in sample_dataloader:
        images = pipeline(example["prompt"], height=resolution, width=resolution, num_inference_steps=steps).images
        for i, image in enumerate(images):
            hash_image = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(out / f"{example['index'][i]}-{hash_image}.jpg")
    return (time.perf_counter() - start) / n, (time.process_time() - cpu) / n


def adapt_row(model: Path, n: int, resolution: int, scheduler: str, steps: int, batch: int, dtype,
              out: Path) -> tuple[float, float]:
    """adapt.classimages.ensure_class_images, timed from the moment its pipeline is loaded; (wall, CPU)
    seconds per image."""
    import adapt.infer
    from adapt.classimages import ensure_class_images

    loaded, real = {}, adapt.infer.load_pipeline

    def timed_load(*a, **k):
        pipe = real(*a, **k)
        loaded["at"], loaded["cpu"] = time.perf_counter(), time.process_time()
        return pipe

    adapt.infer.load_pipeline = timed_load
    try:
        ensure_class_images(str(model), PROMPT, n, resolution, scheduler=scheduler, steps=steps, folder=out,
                            batch_size=batch, progress=False, dtype=dtype)
    finally:
        adapt.infer.load_pipeline = real
    return (time.perf_counter() - loaded["at"]) / n, (time.process_time() - loaded["cpu"]) / n


def one(row: str, model: Path, n: int, resolution: int, scale: float) -> dict:
    """One measurement (in its own process): the row's settings and its seconds per image."""
    import torch

    from adapt.config import DreamBoothConfig

    ref_steps, db = max(1, round(50 * scale)), DreamBoothConfig()
    settings = {"reference": ("model's (PNDM)", ref_steps, 4, "fp32"), "equal-b4": ("pndm", ref_steps, 4, "fp32"),
                "equal": ("pndm", ref_steps, 8, "fp32"),
                "defaults": (db.class_scheduler, max(1, round(db.class_steps * scale)), 8, "fp32"),
                "bf16": (db.class_scheduler, max(1, round(db.class_steps * scale)), 8, "bf16")}[row]
    scheduler, steps, batch, precision = settings
    with tempfile.TemporaryDirectory() as tmp:
        if row == "reference":
            sec, cpu = reference(model, n, resolution, steps, Path(tmp))
        else:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
            sec, cpu = adapt_row(model, n, resolution, scheduler, steps, batch, dtype, Path(tmp) / "class")
    return {"row": row, "scheduler": scheduler, "steps": steps, "batch": batch, "precision": precision, "sec": sec,
            "cpu": cpu, "threads": torch.get_num_threads()}


def report(results: dict[str, list[dict]]) -> None:
    """Medians per row, wall and CPU (user + sys of the process: less moved by other jobs), and
    their ratios to the reference's."""
    med = {row: {k: statistics.median(r[k] for r in runs) for k in ("sec", "cpu")} for row, runs in results.items()}
    ref = med.get("reference")
    print(f"\n{'row':<10} {'scheduler':<16} {'steps':>5} {'batch':>5} {'dtype':>5} {'runs':>4} {'wall s/img':>10} "
          f"{'cpu s/img':>9} {'wall ratio':>10} {'cpu ratio':>9}")
    for row, runs in results.items():
        s, m = runs[0], med[row]
        ratios = (f"{m['sec'] / ref['sec']:>10.2f} {m['cpu'] / ref['cpu']:>9.2f}" if ref else f"{'-':>10} {'-':>9}")
        print(f"{row:<10} {s['scheduler']:<16} {s['steps']:>5} {s['batch']:>5} {s['precision']:>5} {len(runs):>4} "
              f"{m['sec']:>10.2f} {m['cpu']:>9.2f} {ratios}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps-scale", type=float, default=0.2, help="both step counts x this (1: 50 vs 25)")
    ap.add_argument("--images", type=int, default=8, help="class images per measurement (8: one adapt batch)")
    ap.add_argument("--rounds", type=int, default=2, help="measurements per row, interleaved across rows")
    ap.add_argument("--only", default=",".join(ROWS), help="comma-separated rows")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, help="a folder build_model wrote before (default: build one, ~4 GB, in a temp folder)")
    a = ap.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.model, a.images, a.resolution, a.steps_scale)))
        return
    rows = [r for r in a.only.split(",") if r]
    results: dict[str, list[dict]] = {r: [] for r in rows}
    with tempfile.TemporaryDirectory(prefix="adapt-classimages-") as tmp:
        model = a.model or build_model(Path(tmp) / "sd15")
        for k in range(a.rounds):
            for row in rows:
                cmd = [sys.executable, __file__, "--one", row, "--model", str(model), "--images", str(a.images),
                       "--resolution", str(a.resolution), "--steps-scale", str(a.steps_scale)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res = json.loads(out.stdout.strip().splitlines()[-1])
                results[row].append(res)
                print(f"round {k + 1} {row}: {res['sec']:.2f} s/image, cpu {res['cpu']:.2f} s/image ({res['scheduler']}, "
                      f"{res['steps']} steps, batch {res['batch']}, {res['precision']}, {res['threads']} threads)", flush=True)
    print(f"\nSD 1.5 architecture, random weights, {a.resolution} px, {a.images} images per measurement, "
          f"load avg at end {os.getloadavg()[0]:.1f}")
    report(results)


if __name__ == "__main__":
    main()
