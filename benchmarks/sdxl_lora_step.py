"""One LoRA training step on the real SDXL architecture (random weights) through adapt's loop.

Builds the SDXL UNet (2.6B parameters), the SDXL VAE and both text encoders (CLIP-L and OpenCLIP
bigG) from their configs with random weights, directly in bf16 (nothing downloaded), and runs
`adapt.train.train` with the LoRA method (Q,K, rank 4), cached latents and text embeddings (the
encoders are freed after caching), bf16 mixed precision, batch 1 at --resolution (default 512),
for --steps steps. Prints seconds per step (after the first) and the process's peak RSS.

    python benchmarks/sdxl_lora_step.py --steps 2 --resolution 512
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

VAE_SDXL = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=1024,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.13025, force_upcast=True)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
              pad_token_id=49407)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from adapt import models as M
    from adapt.config import LoraConfig
    from adapt.data import instance_examples
    from adapt.methods.lora import LoraMethod
    from adapt.train import train
    from adapt.train_config import TrainConfig
    from sd_models import _images

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16: the frozen weights train in bf16 anyway
    c = M.Components(CLIPTokenizer.from_pretrained(M.TOKENIZER_DIR), CLIPTextModel(CLIPTextConfig(**CLIP_L)),
                     AutoencoderKL(**VAE_SDXL), UNet2DConditionModel(**M.SDXL_UNET), DDPMScheduler(**M.SD15_SCHEDULER), Path("."),
                     CLIPTokenizer.from_pretrained(M.TOKENIZER_DIR), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G)))
    torch.set_default_dtype(torch.float32)
    for m in (c.text_encoder, c.text_encoder_2, c.vae, c.unet):
        m.requires_grad_(False).eval()
    n_unet = sum(p.numel() for p in c.unet.parameters())
    build = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        examples = instance_examples(_images(Path(tmp) / "img", a.resolution, n=1), "<sks>", "a photo of {token}")
        times = train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=1 + a.steps, mixed_precision="bf16"),
                      Path(tmp) / "o", resolution=a.resolution, progress=False)["step_seconds"]
    per_step = sum(times[1:]) / a.steps  # the first step (allocations, warm-up) is reported apart
    print(f"SDXL UNet {n_unet / 1e9:.2f}B params, {a.resolution} px, batch 1, LoRA q,k r4, bf16, cached latents+text")
    print(f"build {build:.0f} s; first step {times[0]:.1f} s; then {per_step:.1f} s/step over {a.steps} steps")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")
    if torch.cuda.is_available():
        print(f"GPU {torch.cuda.get_device_name()}: peak allocated {torch.cuda.max_memory_allocated() / 1024 ** 3:.2f} GB, "
              f"{1 / per_step:.2f} it/s")


if __name__ == "__main__":
    main()
