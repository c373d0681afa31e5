"""Inference figures on the bundled base model, measured in one run.

1. Fused vs unfused LoRAs: seconds to render 8 images (25 steps, dpm++2m-karras, batch 8) with
   0, 1 and 3 LoRAs (rank 4 on every attention Q/K/V/out, random weights), applied as adapters or
   fused into the weights (`--fuse`); each configuration timed twice, the best time kept.
2. Scheduler quality vs steps: eval fidelity (retrieval top-1 / top-5 of the intended emoji among
   the references, adapt's feature space) and the mean distance of each image to its own reference
   over the first --captions training captions, for ddpm, euler-a and dpm++2m-karras at 10, 20
   and 50 steps.

    python benchmarks/inference.py --refs ../shared/data/emoji/noto
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


def random_loras(n: int, folder: Path) -> list[str]:
    import torch

    from adapt.loras import Lora, write_lora
    from adapt.models import load_components

    unet = load_components(None).unet
    g = torch.Generator().manual_seed(0)
    files = []
    for i in range(n):
        loras = {f"unet.{name}": Lora(torch.randn(4, m.in_features, generator=g) * 0.01,
                                      torch.randn(m.out_features, 4, generator=g) * 0.01, 4.0)
                 for name, m in unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))}
        files.append(str(write_lora(folder / f"lora{i}.safetensors", loras)))
    return files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--refs", default=str(ROOT.parent / "shared" / "data" / "emoji" / "noto"))
    p.add_argument("--captions", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import numpy as np
    import torch

    from adapt.metrics import features, retrieval
    from adapt.infer import generate, load_pipeline
    from adapt.models import BUNDLED_MODEL

    torch.set_num_threads(a.threads)
    prompts, seeds = ["an emoji of cat face"] * 8, list(range(8))
    with tempfile.TemporaryDirectory() as tmp:
        files = random_loras(3, Path(tmp))
        print("LoRAs  mode      seconds (8 images, 25 steps)")
        base_time = None
        for n in (0, 1, 3):
            for fuse in ((False,) if n == 0 else (False, True)):
                pipe = load_pipeline(None, "dpm++2m-karras", loras=[(f, 0.5) for f in files[:n]], fuse=fuse)
                best = float("inf")
                for _ in range(2):
                    start = time.perf_counter()
                    generate(pipe, prompts, seeds, steps=25, guidance=3.0)
                    best = min(best, time.perf_counter() - start)
                base_time = base_time or best
                print(f"{n:<6} {'fused' if fuse else 'adapters' if n else 'base':<9} {best:7.2f}   x{best / base_time:.2f} of base")

    rows = [json.loads(line) for line in (BUNDLED_MODEL / "training_set.jsonl").read_text().splitlines()][:a.captions]
    refs = features([Path(a.refs) / r["file"] for r in rows])
    print(f"\nfidelity over {len(rows)} training captions (chance top-1 {1 / len(rows):.3f}, top-5 {5 / len(rows):.3f})")
    print("scheduler        steps  top-1  top-5  dist to own ref  seconds")
    for name in ("ddpm", "euler-a", "dpm++2m-karras"):
        pipe = load_pipeline(None, name)
        for steps in (10, 20, 50):
            start = time.perf_counter()
            images = generate(pipe, [r["caption"] for r in rows], list(range(len(rows))), steps=steps, guidance=7.5,
                              batch_size=20)
            feats = features(images)
            fid = retrieval(feats, refs, list(range(len(rows))))
            own = float(np.linalg.norm(feats - refs, axis=1).mean())  # finer than retrieval once that saturates
            print(f"{name:<16} {steps:>5}  {fid['top1']:.3f}  {fid['top5']:.3f}  {own:15.3f}  {time.perf_counter() - start:7.1f}")


if __name__ == "__main__":
    main()
