"""How close is `--dry-run`'s estimate (adapt/estimate.py) to a measured run?

For each configuration, a separate process loads the model, trains a few steps with adapt's loop,
and reports its peak memory over the run (VmHWM minus the memory before the model was loaded, on
CPU; torch.cuda.max_memory_allocated on a GPU) and its median step time after a warm-up. The table
puts the estimate beside it, with the ratio, and the constants the measurements imply (to
re-calibrate adapt/estimate.py). Run on an otherwise idle machine:

    python benchmarks/estimate.py                       # tiny, bundled, SD 1.5 architecture (random weights)
    python benchmarks/estimate.py --configs tiny-lora-64,sd15-lora-128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = ("tiny-lora-64,tiny-full-64,bundled-lora-64,bundled-full-64,bundled-embedding-64,"
           "sd15-lora-128,sd15-lora-256,sd15-lora-256-ckpt,sd15-full-128")
KIND_METHOD = {"lora": "lora", "full": "dreambooth", "embedding": "textual-inversion"}


def model_folder(name: str, cache: Path) -> Path:
    from adapt import models as M

    if name == "bundled":
        return M.BUNDLED_MODEL
    folder = cache / name
    if not (folder / "model_index.json").is_file():
        parts = {"tiny": (M.TINY_UNET, M.TINY_VAE, M.TINY_TEXT), "sd15": (M.SD15_UNET, M.SD15_VAE, M.SD15_TEXT)}[name]
        M.build_pipeline_folder(folder, *parts, seed=0)
    return folder


def _kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def measure(model: Path, kind: str, resolution: int, checkpointing: bool, steps: int) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    from adapt.config import LoraConfig, TextualInversionConfig
    from adapt.data import instance_examples
    from adapt.methods.full import FullMethod
    from adapt.methods.lora import LoraMethod
    from adapt.methods.textual_inversion import TextualInversionMethod
    from adapt.models import load_components
    from adapt.train import train
    from adapt.train_config import TrainConfig

    cuda = torch.cuda.is_available()
    before = _kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak counts from here
    c = load_components(str(model), device="cuda" if cuda else "cpu")
    method = {"lora": lambda: LoraMethod(LoraConfig()), "full": lambda: FullMethod(),
              "embedding": lambda: TextualInversionMethod(TextualInversionConfig(init_token="cat"), "<new>")}[kind]()
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.RandomState(0)
        for i in range(4):
            Image.fromarray(rng.randint(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(Path(tmp) / f"{i}.png")
        token = "<new>" if kind == "embedding" else "<sks>"
        examples = instance_examples(tmp, token, "a photo of {token}")
        cfg = TrainConfig(steps=steps, gradient_checkpointing=checkpointing, lr=1e-5)
        times = train(c, method, examples, cfg, Path(tmp) / "out", resolution=resolution, progress=False)["step_seconds"]
    peak = torch.cuda.max_memory_allocated() if cuda else (_kb("VmHWM") - before) * 1024
    return {"peak_bytes": peak, "seconds_per_step": statistics.median(times[2:])}


def parse(config: str) -> tuple[str, str, int, bool]:
    parts = config.split("-")
    return parts[0], parts[1], int(parts[2]), "ckpt" in parts[3:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=DEFAULT, help="MODEL-KIND-RESOLUTION[-ckpt],... (model: tiny|bundled|sd15)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "adapt-estimate-models"))
    p.add_argument("--one", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(Path(a.one[0]), a.one[1], int(a.one[2]), a.one[3] == "1", a.steps)))
        return
    from adapt.estimate import estimate

    print(f"{'config':<24} {'peak MB est':>11} {'measured':>9} {'ratio':>6} {'s/step est':>10} {'measured':>9} {'ratio':>6}"
          f" {'act B/unit':>10} {'MAC/s':>9}")
    for config in a.configs.split(","):
        name, kind, res, ckpt = parse(config)
        folder = model_folder(name, Path(a.cache))
        cmd = [sys.executable, __file__, "--one", str(folder), kind, str(res), "1" if ckpt else "0", "--steps", str(a.steps)]
        got = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
        est = estimate(folder, kind=kind, resolution=res, batch=1, checkpointing=ckpt)
        implied = implied_constants(folder, kind, res, ckpt, got)
        print(f"{config:<24} {est.peak_bytes / 2**20:>11.0f} {got['peak_bytes'] / 2**20:>9.0f} "
              f"{est.peak_bytes / got['peak_bytes']:>6.2f} {est.seconds_per_step:>10.3f} {got['seconds_per_step']:>9.3f} "
              f"{est.seconds_per_step / got['seconds_per_step']:>6.2f} {implied[0]:>10.1f} {implied[1]:>9.2e}", flush=True)


def implied_constants(folder: Path, kind: str, res: int, ckpt: bool, got: dict) -> tuple[float, float]:
    """The ACT_BYTES and CPU_MACS_PER_S that would make the estimate equal this measurement."""
    from adapt import estimate as E

    unit = E.estimate(folder, kind=kind, resolution=res, batch=1, checkpointing=ckpt)
    act_volume = unit.parts["activations"] / (E.ACT_BYTES[kind] * (E.CKPT_FRACTION if ckpt else 1.0))
    rest = got["peak_bytes"] - (unit.peak_bytes - unit.parts["activations"])
    rate_units = (unit.seconds_per_step - E.OVERHEAD_S) * E.CPU_MACS_PER_S["no"]  # MACs x passes
    return rest / act_volume / (E.CKPT_FRACTION if ckpt else 1.0), rate_units / max(got["seconds_per_step"] - E.OVERHEAD_S, 1e-9)


if __name__ == "__main__":
    main()
