"""How much does adapt's training loop cost over the bare UNet work it has to do?

For each model (the tiny test model, and the real SD 1.5 architecture with random weights at
256 px) this times, in separate processes so peak memory is per measurement:

* adapt: `adapt.train.train` with the LoRA method (Q,K, rank 4), cached latents and text,
  batch 1, N steps; time per step over the loop (setup and caching excluded, warm-up excluded);
* bare: the same UNet with the same peft LoRA adapters, one fixed batch (latents, text states,
  noise, timestep), forward + MSE + backward + AdamW step + zero_grad, N steps.

It prints ms/step for both, the ratio adapt / bare (target <= 1.10) and the peak RSS of each
process. Run on an otherwise idle machine:

    python benchmarks/step_time.py            # tiny + sd15 at 256 px
    python benchmarks/step_time.py --models tiny --steps 50
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


def _components(name: str):
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from adapt import models as M

    unet, vae, text = {"tiny": (M.TINY_UNET, M.TINY_VAE, M.TINY_TEXT), "sd15": (M.SD15_UNET, M.SD15_VAE, M.SD15_TEXT)}[name]
    torch.manual_seed(0)
    c = M.Components(CLIPTokenizer.from_pretrained(M.TOKENIZER_DIR), CLIPTextModel(CLIPTextConfig(**text)),
                     AutoencoderKL(**vae), UNet2DConditionModel(**unet), DDPMScheduler(**M.SD15_SCHEDULER), Path("."))
    for m in (c.text_encoder, c.vae, c.unet):
        m.requires_grad_(False).eval()
    return c


def _images(folder: Path, size: int, n: int = 4) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def measure(model: str, mode: str, steps: int, resolution: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from adapt.config import LoraConfig, TrainConfig
    from adapt.data import instance_examples
    from adapt.methods.lora import LoraMethod
    from adapt.train import train

    c = _components(model)
    res = resolution if model == "sd15" else 16
    warmup = 2
    if mode == "adapt":
        with tempfile.TemporaryDirectory() as tmp:
            examples = instance_examples(_images(Path(tmp) / "img", res), "<sks>", "a photo of {token}")
            # per-step times from the loop; the first `warmup` steps are left out, as for bare
            times = train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=warmup + steps), Path(tmp) / "o",
                          resolution=res, progress=False)["step_seconds"]
        seconds = sum(times[warmup:])
    else:
        from peft import LoraConfig as PeftLoraConfig

        unet = c.unet
        unet.add_adapter(PeftLoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k"]))
        unet.train()
        params = [p for p in unet.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        g = torch.Generator().manual_seed(0)
        lat = res // 2 ** (len(c.vae.config.block_out_channels) - 1)  # the VAE's downsampling
        latents = torch.randn(1, 4, lat, lat, generator=g)
        noise = torch.randn(1, 4, lat, lat, generator=g)
        hidden = torch.randn(1, 77, c.text_encoder.config.hidden_size, generator=g)
        t = torch.tensor([500])
        noisy = c.noise_scheduler.add_noise(latents, noise, t)

        def step():
            pred = unet(noisy, t, hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        start = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = time.perf_counter() - start
    return {"model": model, "mode": mode, "ms_per_step": 1000 * seconds / steps, "steps": steps,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="tiny,sd15")
    p.add_argument("--steps", type=int, default=0, help="timed steps (default: 100 tiny, 5 sd15)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one[0], a.one[1], a.steps or (100 if a.one[0] == "tiny" else 5), a.resolution, a.threads)))
        return
    print(f"{'model':<6} {'adapt ms/step':>14} {'bare ms/step':>13} {'ratio':>6} {'adapt RSS MB':>13} {'bare RSS MB':>12}")
    for model in a.models.split(","):
        rows = {}
        for mode in ("bare", "adapt"):
            cmd = [sys.executable, __file__, "--one", model, mode, "--steps", str(a.steps), "--resolution",
                   str(a.resolution), "--threads", str(a.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows[mode] = json.loads(out.strip().splitlines()[-1])
        ad, bare = rows["adapt"], rows["bare"]
        print(f"{model:<6} {ad['ms_per_step']:>14.1f} {bare['ms_per_step']:>13.1f} {ad['ms_per_step'] / bare['ms_per_step']:>6.3f} "
              f"{ad['peak_rss_mb']:>13.0f} {bare['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()
