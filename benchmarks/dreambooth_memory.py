"""Peak memory of one DreamBooth step on the SD 1.5 architecture for each recipes/dreambooth-*gb.toml.

Each preset runs in its own process: the real SD 1.5 UNet / VAE / CLIP-L text encoder built from
their configs with random weights (nothing downloaded), one instance image and one class image
(prior preservation: each batch holds both), `adapt.train.train` for one optimizer step with the
preset's settings. Reported: peak resident memory of the process (CPU) and, when a GPU is used,
torch.cuda.max_memory_allocated. On CPU, fp16 presets run with bf16 autocast instead (accelerate
has no fp16 autocast on CPU; both store activations and frozen weights in 2 bytes).

    python benchmarks/dreambooth_memory.py                  # all presets, 512 px
    python benchmarks/dreambooth_memory.py --presets 12 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))


def one(preset: str, resolution: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from sd_models import _components, _images

    from adapt.methods import METHODS
    from adapt.recipe import build, read_recipe
    from adapt.data import Example
    from adapt.train import train

    recipe = read_recipe(ROOT / "recipes" / f"dreambooth-{preset}gb.toml")
    spec = METHODS["dreambooth"]
    cfgs = {s: build(s, recipe, {}) for s in spec.sections if s != "train"}
    train_cfg = cfgs["train"] = build("train", recipe, {"steps": 1, "checkpoint_every": 0})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and train_cfg.mixed_precision == "fp16":
        train_cfg.mixed_precision = "bf16"
    optimizer = train_cfg.optimizer
    c = _components("sd15")
    with tempfile.TemporaryDirectory() as tmp:
        img = _images(Path(tmp) / "img", resolution, n=2)
        examples = [Example(img / "0.png", "a photo of sks dog"), Example(img / "1.png", "a photo of dog", 1.0, 1)]
        method = spec.resolve(cfgs).load().from_configs(cfgs)  # with `lora = true`, the LoRA method, as `adapt dreambooth` runs it
        method.save = lambda *args, **kw: None  # measure the step, not writing 4 GB of random weights
        start = time.perf_counter()
        train(c, method, examples, train_cfg, Path(tmp) / "out", resolution=resolution,
              progress=False)
        seconds = time.perf_counter() - start
    return {"preset": f"{preset}gb", "device": device, "precision": train_cfg.mixed_precision, "optimizer": optimizer,
            "gradient_checkpointing": train_cfg.gradient_checkpointing,
            "trains": "LoRA" if cfgs["dreambooth"].lora else ("UNet+text encoder" if cfgs["dreambooth"].train_text_encoder else "UNet"),
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2,
            "gpu_peak_gb": torch.cuda.max_memory_allocated() / 1024 ** 3 if device == "cuda" else None,
            "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="8,12,16,24")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a.resolution, a.threads)))
        return
    print(f"resolution {a.resolution}, batch = 1 instance + 1 class image")
    print(f"{'preset':<7} {'trains':<18} {'precision':<9} {'optimizer':<10} {'grad ckpt':<9} {'peak RSS GB':>11} {'GPU peak GB':>11} {'s':>6}")
    for preset in a.presets.split(","):
        cmd = [sys.executable, __file__, "--one", preset, "--resolution", str(a.resolution), "--threads", str(a.threads)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{preset + 'gb':<7} failed (exit {r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
            continue
        d = json.loads(r.stdout.strip().splitlines()[-1])
        gpu = f"{d['gpu_peak_gb']:.2f}" if d["gpu_peak_gb"] is not None else "-"
        print(f"{d['preset']:<7} {d['trains']:<18} {d['precision']:<9} {d['optimizer']:<10} {str(d['gradient_checkpointing']):<9} "
              f"{d['peak_rss_gb']:>11.2f} {gpu:>11} {d['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
