"""adapt's training step side by side with the diffusers example's loop and with a bare UNet step.

Three ways of doing the same training, each in its own process (so peak memory is per
measurement), on the real SD 1.5 architecture with random weights (nothing downloaded):

* adapt: `adapt.train.train` at adapt's defaults (LoRA: Q,K rank 4; DreamBooth: the full UNet with
  prior preservation), cached latents and text embeddings, the given precision;
* reference: the structure of diffusers' examples/dreambooth/train_dreambooth_lora.py and
  train_dreambooth.py at their defaults, written out here: every step encodes the images with the
  VAE and the prompt with the text encoder, LoRA on to_q, to_k, to_v, to_out.0 (rank 4), frozen
  weights in the precision's dtype, trainable weights fp32, accelerate-style autocast, AdamW with
  the scripts' settings, gradient clipping at 1.0;
* bare: only the UNet's forward + MSE + backward + AdamW step (fused, adapt's default kernel) on one
  fixed batch (the same adapters or the same full UNet as adapt) - the floor any trainer sits on.

Batches: LoRA 1 image; DreamBooth 1 instance + 1 class image (prior preservation). Each process
times `--steps` steps after `--warmup` steps and reports the median step and its range, and its
peak memory during the timed steps (what training holds: the models as they train, optimizer state,
activations), less the process's memory before the model was built (VmHWM, restarted after the
warm-up; on a GPU max_memory_allocated). Configurations run interleaved, `--repeats` times, and the table gives
the median over repeats. Run on an otherwise idle machine:

    python benchmarks/compare.py                                   # LoRA 256+512, DreamBooth 256; fp32+bf16
    python benchmarks/compare.py --methods lora --resolutions 256 --precisions bf16 --repeats 1
    python benchmarks/compare.py --variants compile,channels_last,fused   # adapt with each option, vs without
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from compare_report import summarise  # noqa: E402

MODES = ("reference", "adapt", "bare")
VARIANTS = {"compile": {"compile": True}, "channels_last": {"channels_last": True}, "fused": {"adamw_kernel": "fused"},
            "foreach": {"adamw_kernel": "foreach"}, "for": {"adamw_kernel": "for"},
            "fused_backward_off": {"fused_backward": "off"},  # auto steps a full UNet inside backward
            "recast_off": {"recast_weights": False}}  # keep autocast's cast copies of trainable weights for backward
DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _batch(c, method: str, res: int, device):
    """Pixels in [-1, 1], token ids and the fixed latents / text states of one batch."""
    import torch

    g = torch.Generator().manual_seed(0)
    n = 2 if method == "dreambooth" else 1
    pixels = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    ids = c.tokenizer(["a photo of sks dog", "a photo of dog"][:n], padding="max_length", max_length=77,
                      return_tensors="pt").input_ids
    return pixels.to(device), ids.to(device)


def _adapters(unet, targets: list[str]) -> None:
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets))


def _frozen_to(c, dtype, trainable: set[int], device) -> None:
    import torch

    for m in (c.text_encoder, c.vae, c.unet):
        m.to(device)
        for p in m.parameters():
            p.data = p.data.to(torch.float32 if id(p) in trainable else dtype)


def reset_peak() -> None:
    """Peak memory counts from here: after the warm-up steps, so it is what training holds (the models as they
    train, the optimizer's state, the activations), not the fp32 model the benchmark builds first."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak is max_memory_allocated there
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM restarts from the current RSS


def hand_loop(c, method: str, mode: str, res: int, precision: str, steps: int, device, warmup: int) -> list[float]:
    """The reference structure (encode every step) or the bare UNet step, timed per step."""
    import torch
    import torch.nn.functional as F

    dtype = getattr(torch, DTYPE[precision])
    if method == "lora":
        c.unet.requires_grad_(False)
        _adapters(c.unet, ["to_q", "to_k", "to_v", "to_out.0"] if mode == "reference" else ["to_q", "to_k"])
    else:
        c.unet.requires_grad_(True)
    params = [p for p in c.unet.parameters() if p.requires_grad]
    _frozen_to(c, dtype, {id(p) for p in params}, device)
    c.unet.train()
    # the scripts' AdamW: lr 5e-4 (LoRA) / 5e-6 (DreamBooth), betas (0.9, 0.999), weight decay 1e-2, eps 1e-8
    # (bare: with adapt's default kernel, fused, so that adapt / bare is what adapt's loop adds to the same work)
    opt = torch.optim.AdamW(params, lr=5e-4 if method == "lora" else 5e-6, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8,
                            fused=True if mode == "bare" else None)
    pixels, ids = _batch(c, method, res, device)
    g = torch.Generator(device).manual_seed(0)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")
    with torch.no_grad():
        fixed_latents = c.vae.encode(pixels.to(dtype)).latent_dist.sample(g) * c.vae.config.scaling_factor
        fixed_states = c.text_encoder(ids)[0]

    def step():
        if mode == "reference":
            latents = c.vae.encode(pixels.to(dtype)).latent_dist.sample(g) * c.vae.config.scaling_factor
            states = c.text_encoder(ids)[0]
        else:
            latents, states = fixed_latents, fixed_states
        noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
        t = torch.randint(0, 1000, (latents.shape[0],), generator=g, device=device)
        noisy = c.noise_scheduler.add_noise(latents, noise, t)
        with autocast:
            pred = c.unet(noisy, t, states).sample
        if method == "dreambooth":  # the script's prior preservation: instance half + prior_loss_weight 1.0 x class half
            pred, prior = pred.chunk(2)
            noise, prior_noise = noise.chunk(2)
            loss = F.mse_loss(pred.float(), noise.float()) + F.mse_loss(prior.float(), prior_noise.float())
        else:
            loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(steps):
        if i == warmup:
            reset_peak()
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def adapt_loop(c, method: str, res: int, precision: str, steps: int, options: dict, warmup: int) -> list[float]:
    """adapt's own loop (train.train) at its defaults plus `options` (TrainConfig fields); the peak memory
    restarts after `warmup` steps (a wrapper around train.record, which runs after every optimizer step)."""
    from sd_models import _images

    from adapt.config import LoraConfig
    from adapt.data import Example
    from adapt.methods.full import FullMethod
    from adapt.methods.lora import LoraMethod
    from adapt import train as loop
    from adapt.train import train
    from adapt.train_config import TrainConfig

    record = loop.record

    def record_then_reset(run, *args, **kwargs):
        out = record(run, *args, **kwargs)
        if run.step == warmup:
            reset_peak()
        return out

    loop.record = record_then_reset

    with tempfile.TemporaryDirectory() as tmp:
        paths = sorted(_images(Path(tmp), res, n=2).glob("*.png"))
        if method == "lora":
            m, examples, lr = LoraMethod(LoraConfig()), [Example(paths[0], "a photo of sks dog")], 1e-4
        else:
            m = FullMethod()
            m.save = lambda *a, **k: None  # time the steps, not writing 3.4 GB of random weights
            examples, lr = [Example(paths[0], "a photo of sks dog"), Example(paths[1], "a photo of dog", 1.0, 1)], 5e-6
        cfg = TrainConfig(steps=steps, lr=lr, mixed_precision={"fp32": "no"}.get(precision, precision), disk_cache=False,
                          **options)
        return train(c, m, examples, cfg, Path(tmp) / "out", resolution=res, progress=False)["step_seconds"]


def measure(spec: dict) -> dict:
    import torch

    from sd_models import _components

    torch.set_num_threads(spec["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    import accelerate, diffusers, peft, transformers  # noqa: E401,F401  (the libraries' own memory is not the training's)

    import adapt.train  # noqa: F401
    before = _kb("VmRSS")
    if spec["model"] == "bundled":
        from adapt.models import load_components

        c = load_components(None)
    else:
        c = _components(spec["model"])
    spec = {**spec, "unet_params": sum(p.numel() for p in c.unet.parameters())}  # before any adapter
    total = spec["warmup"] + spec["steps"]
    if spec["mode"] == "adapt":
        times = adapt_loop(c, spec["method"], spec["res"], spec["precision"], total, spec.get("options", {}), spec["warmup"])
    else:
        times = hand_loop(c, spec["method"], spec["mode"], spec["res"], spec["precision"], total, device, spec["warmup"])
    timed = times[spec["warmup"]:]
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else (_kb("VmHWM") - before) / 1024
    return {**spec, "median_s": statistics.median(timed), "min_s": min(timed), "max_s": max(timed),
            "warmup_s": sum(times[:spec["warmup"]]), "peak_mb": peak}


def run_one(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode:
        return {**spec, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="lora,dreambooth")
    p.add_argument("--resolutions", default="256,512", help="LoRA resolutions; DreamBooth runs at the first only "
                   "(a full fp32 UNet with AdamW state needs ~14 GB before activations)")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--modes", default=",".join(MODES), help="which of " + ", ".join(MODES) + " to run (default: all)")
    p.add_argument("--variants", default="", help="also time adapt with each of: " + ", ".join(VARIANTS))
    p.add_argument("--model", default="sd15", help="sd15 (SD 1.5 architecture, random weights), bundled (the emoji base, "
                   "64 px) or tiny (to try the script quickly)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--from-log", type=Path, help="print the tables again from the JSON lines an earlier run printed "
                   "(also of a run stopped part-way)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return
    if a.from_log:
        if not a.from_log.is_file():
            p.error(f"--from-log {a.from_log}: no such file; pass the output an earlier run printed")
        rows = [json.loads(line) for line in a.from_log.read_text().splitlines() if line.startswith("{")]
        if not rows:
            p.error(f"--from-log {a.from_log}: no result lines (JSON objects) in it")
        return summarise(rows)
    resolutions = [int(r) for r in a.resolutions.split(",")]
    if bad := set(a.modes.split(",")) - set(MODES):
        p.error(f"--modes: unknown {', '.join(sorted(bad))}; pick from {', '.join(MODES)}")
    specs = []
    for method in a.methods.split(","):
        for res in resolutions if method == "lora" else resolutions[:1]:
            for prec in a.precisions.split(","):
                for mode in a.modes.split(","):
                    specs.append({"method": method, "res": res, "precision": prec, "mode": mode, "label": mode})
                for v in filter(None, a.variants.split(",")):
                    specs.append({"method": method, "res": res, "precision": prec, "mode": "adapt", "label": f"adapt +{v}",
                                  "options": VARIANTS[v]})
    rows: list[dict] = []
    for rep in range(a.repeats):  # interleaved: every configuration once per round
        for spec in specs:
            spec = {**spec, "steps": a.steps, "warmup": a.warmup, "threads": a.threads, "model": a.model}
            r = run_one(spec)
            rows.append(r)
            print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)
    summarise(rows)


if __name__ == "__main__":
    main()
