"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint folder `checkpoints/step-000100/` holds
    trainable.safetensors   the trainable weights only (a LoRA checkpoint stays small)
    optimizer.pt            optimizer, LR-scheduler and grad-scaler state (tensors and numbers
                            only: read back with torch.load(weights_only=True))
    rng.safetensors         the loop's generators (data order, flips/caption dropout, noise) and
                            torch's global CPU/CUDA generators
    loop.json               step, pending batch order, losses so far, the recipe, and the
                            global numpy / python random states
It is written under a temporary name and renamed when complete, so a crash mid-save leaves the
previous checkpoint usable.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from .errors import AdaptError
from .fileio import atomic_dir

PREFIX = "step-"


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "loop.json").is_file())


def find_checkpoint(root: Path, resume: str) -> Path:
    """'latest' -> the newest complete checkpoint under root; anything else is a checkpoint folder."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise AdaptError(f"--resume latest: no checkpoint in {root}; start without --resume, or pass --resume DIR")
        return found[-1]
    path = Path(resume)
    if not (path / "loop.json").is_file():
        raise AdaptError(f"--resume {path} is not a checkpoint folder (no loop.json); pass 'latest' or a checkpoints/step-N folder")
    return path


def save_checkpoint(root: Path, step: int, named_params: dict, optimizer, lr_scheduler, scaler,
                    generators: dict, loop: dict, keep: int) -> Path:
    import numpy as np
    import torch
    from safetensors.torch import save_file

    final = root / f"{PREFIX}{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().float().contiguous().cpu() for n, p in named_params.items()}, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        rng = {k: g.get_state() for k, g in generators.items()}
        rng["torch_global"] = torch.get_rng_state()
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        global_rng = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "loop.json").write_text(json.dumps({"step": step, **loop, "global_rng": global_rng}))
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, named_params: dict, optimizer, lr_scheduler, scaler, generators: dict) -> dict:
    import numpy as np
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "trainable.safetensors"))
    if weights.keys() != named_params.keys() or any(weights[n].shape != p.shape for n, p in named_params.items()):
        raise AdaptError(f"checkpoint {path} holds other trainable weights than this run (another method, rank or model?); "
                         "resume with the recipe that made it, or start a new --output")
    with torch.no_grad():
        for n, p in named_params.items():
            p.copy_(weights[n].to(p.dtype))
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    for k, t in load_file(str(path / "rng.safetensors")).items():
        if k in generators:
            generators[k].set_state(t)
        elif k == "torch_global":
            torch.set_rng_state(t)
        elif k.startswith("torch_cuda_") and torch.cuda.is_available() and int(k[11:]) < torch.cuda.device_count():
            torch.cuda.set_rng_state(t, int(k[11:]))
    loop = json.loads((path / "loop.json").read_text())
    if "global_rng" in loop:
        version, state, gauss = loop["global_rng"]["python"]
        random.setstate((version, tuple(state), gauss))
        name, keys, *rest = loop["global_rng"]["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    return loop
