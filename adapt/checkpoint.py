"""Training checkpoints: everything needed to continue a run exactly, written atomically, verified
before use, portable between process counts and device types.

A checkpoint folder `checkpoints/step-000100/` holds
    trainable.safetensors   the trainable weights only (a LoRA checkpoint stays small)
    optimizer.pt            optimizer, LR-scheduler and grad-scaler state (tensors and numbers
                            only: read back with torch.load(weights_only=True))
    rng.safetensors         the loop's generators (data order, flips/caption dropout, noise) and
                            torch's global CPU/CUDA generators
    loop.json               step, pending batch order, losses so far, the recipe, the global
                            numpy / python random states, and the "world" it was made in
                            (processes, per-process batch, accumulation, device type)
    ema.safetensors         with --ema-decay: the moving average of the trainable weights (fp32)
    manifest.json           written last: every other file's size and sha256
It is written under a temporary name and renamed when complete, so a crash mid-save leaves the
previous checkpoint usable. A checkpoint whose files no longer match its manifest (truncated by a
copy, altered) is named as damaged; `--resume latest` then falls back to the newest good one.

Resuming with M processes a checkpoint made with N (same global batch) continues the data order,
noise and optimizer state exactly; only the order in which gradients are summed differs, so the
run matches an uninterrupted one to float precision (said at resume). On another device type the
noise generator cannot be continued (CPU and CUDA generators differ): it is reseeded from the
checkpoint, and the run says so.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import safetensors.torch  # save_file looked up at call time (tests patch it)
import torch

from .errors import AdaptError
from .fileio import CHECKPOINT_PREFIX, atomic_dir, list_checkpoints

log = logging.getLogger("adapt")
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "optimizer.pt", "rng.safetensors", "loop.json")
EMA_FILE = "ema.safetensors"  # only in the checkpoints of runs with --ema-decay


def find_checkpoint(root: Path, resume: str) -> Path:
    """'latest' -> the newest intact checkpoint under root (a damaged newer one is named and
    skipped); anything else is a checkpoint folder, which must be intact."""
    if resume == "latest":
        found = list_checkpoints(root)
        if not found:
            raise AdaptError(f"--resume latest: no checkpoint in {root}; start without --resume, or pass --resume DIR")
        for path in reversed(found):
            problem = damage(path)
            if problem is None:
                return path
            log.warning("checkpoint %s is damaged (%s); falling back to the previous one", path, problem)
        raise AdaptError(f"--resume latest: every checkpoint in {root} is damaged; start without --resume")
    path = Path(resume)
    if not (path / "loop.json").is_file():
        raise AdaptError(f"--resume {path} is not a checkpoint folder (no loop.json); pass 'latest' or a checkpoints/step-N folder")
    problem = damage(path)
    if problem:
        raise AdaptError(f"checkpoint {path} is damaged ({problem}); pass --resume latest for the newest good one, "
                         "or another checkpoint folder")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def damage(path: Path) -> str | None:
    """What is wrong with checkpoint folder `path` against its manifest; None when intact (or when
    it predates manifests: nothing to check it against)."""
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for name in sorted(set(FILES) | set(files)):
        file, want = path / name, files.get(name)
        if want is None:
            return f"{MANIFEST} does not list {name}"
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != want["bytes"]:
            return f"{name} is {file.stat().st_size} bytes, the manifest says {want['bytes']} (truncated?)"
        if _sha256(file) != want["sha256"]:
            return f"{name} does not match the sha256 in the manifest (altered or corrupted)"
    return None


def write_manifest(folder: Path) -> None:
    """The sizes and hashes of every file in `folder`; written last, so its presence means complete."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def save_checkpoint(root: Path, step: int, named_params: dict, optimizer, lr_scheduler, scaler,
                    generators: dict, loop: dict, keep: int, ema: dict | None = None, protect: str | None = None) -> Path:
    """Write checkpoint `step` under root, then prune all but the `keep` newest, and `protect` (a
    checkpoint name: --keep-best's). `ema`: the EMA shadows ({name: tensor}, ema.py), when the run keeps them."""
    final = root / checkpoint_name(step)
    with atomic_dir(final) as tmp:
        trainable = {n: p.detach().float().contiguous().cpu() for n, p in named_params.items()}
        safetensors.torch.save_file(trainable, str(tmp / "trainable.safetensors"))
        if ema is not None:
            safetensors.torch.save_file({n: t.float().contiguous().cpu() for n, t in ema.items()}, str(tmp / EMA_FILE))
        torch.save({"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None}, tmp / "optimizer.pt")
        rng = {k: g.get_state() for k, g in generators.items()}
        rng["torch_global"] = torch.get_rng_state()
        if torch.cuda.is_available():
            rng.update({f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
        safetensors.torch.save_file(rng, str(tmp / "rng.safetensors"))
        np_state = np.random.get_state()
        global_rng = {"python": random.getstate(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}
        (tmp / "loop.json").write_text(json.dumps({"step": step, **loop, "global_rng": global_rng}))
        write_manifest(tmp)
    # Older ones beyond `keep`; a newer folder (left by an abandoned, e.g. damaged, timeline) does not count.
    older = [p for p in list_checkpoints(root) if p.name <= final.name]
    for old in [p for p in older[:-keep] if p.name != protect] if keep > 0 else []:
        trash = old.with_name(f".{old.name}.old.partial")  # renamed first: never a half-deleted checkpoint
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return final


def resume(root: Path, spec: str, named_params: dict, optimizer, lr_scheduler, scaler, generators: dict,
           world: dict, recipe: dict | None, ema: dict | None = None) -> dict:
    """Find the checkpoint `spec` names under root, check it suits this run, load it (and the EMA
    shadows into `ema`, when given); returns loop.json."""
    path = find_checkpoint(root, spec)
    loop = json.loads((path / "loop.json").read_text())
    if recipe is not None and loop.get("recipe") is not None and _without_run_keys(loop["recipe"]) != _without_run_keys(recipe):
        raise AdaptError("the checkpoint was made with another recipe (model, method, data or hyper-parameters differ); "
                         "resume with the same settings, or start a new --output")
    saved = loop.get("world") or world
    _check_global_batch(saved, world, path)
    if saved["num_processes"] != world["num_processes"]:
        log.warning("checkpoint %s was made with %d process(es), this run has %d (the same global batch of %d): data "
                    "order, noise and optimizer state continue exactly, but gradients are summed in another order, so "
                    "the run matches an uninterrupted one to float precision, not bit for bit", path.name,
                    saved["num_processes"], world["num_processes"], world["batch_size"] * world["num_processes"])
    reseeded = load_checkpoint(path, named_params, optimizer, lr_scheduler, scaler, generators,
                               scheduler_scale=(saved["num_processes"], world["num_processes"]), ema=ema)
    if saved["device"] != world["device"] or reseeded:
        log.warning("checkpoint %s was made on %s, this run is on %s: weights, optimizer state and data order continue "
                    "exactly; %s, so losses will not match an uninterrupted run bit for bit", path.name, saved["device"],
                    world["device"], f"the {', '.join(reseeded)} generator cannot move between device types and was "
                    "reseeded from the checkpoint" if reseeded else "the arithmetic differs between device types")
    log.info("resumed from %s (step %d)", path, loop["step"])
    return loop


def _check_global_batch(saved: dict, now: dict, path: Path) -> None:
    total = saved["batch_size"] * saved["num_processes"]
    if now["batch_size"] * now["num_processes"] != total or saved["grad_accum"] != now["grad_accum"]:
        fix = (f"--batch-size {total // now['num_processes']}" if total % now["num_processes"] == 0
               else f"a --num-processes that divides {total}")
        raise AdaptError(f"checkpoint {path} was made with {saved['num_processes']} process(es) x batch "
                         f"{saved['batch_size']} x accumulation {saved['grad_accum']}; this run has {now['num_processes']} x "
                         f"{now['batch_size']} x {now['grad_accum']}. Resume with the same global batch: {fix}, "
                         f"--grad-accum {saved['grad_accum']}")


def load_checkpoint(path: Path, named_params: dict, optimizer, lr_scheduler, scaler, generators: dict,
                    scheduler_scale: tuple[int, int] = (1, 1), ema: dict | None = None) -> list[str]:
    """Restore the state saved in `path` (`ema`: the run's EMA shadows, filled in place); returns
    the names of the generators that had to be reseeded (their state was made on another device type)."""
    _load_tensors(path, "trainable.safetensors", named_params, "other trainable weights than this run (another method, rank or model?)")
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise AdaptError(f"checkpoint {path} has no moving average (made without --ema-decay); resume with the "
                             "settings that made it, or start a new --output")
        _load_tensors(path, EMA_FILE, ema, "another moving average than this run")
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    # accelerate steps the LR schedule once per process per step: N processes leave it at step x N
    before, now = scheduler_scale
    state["lr_scheduler"]["last_epoch"] = state["lr_scheduler"]["last_epoch"] // before * now
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    reseeded = []
    for k, t in safetensors.torch.load_file(str(path / "rng.safetensors")).items():
        if k in generators:
            try:
                generators[k].set_state(t)
            except RuntimeError:  # another device type's generator state: reseeded, deterministically
                generators[k].manual_seed(int.from_bytes(hashlib.sha256(t.numpy().tobytes()).digest()[:8], "little"))
                reseeded.append(k)
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
    return reseeded


def _load_tensors(path: Path, file: str, into: dict, other: str) -> None:
    """Copy the tensors of `path/file` into `into` ({name: tensor}), which must have their names and shapes."""
    saved = safetensors.torch.load_file(str(path / file))
    if saved.keys() != into.keys() or any(saved[n].shape != t.shape for n, t in into.items()):
        raise AdaptError(f"checkpoint {path} holds {other}; resume with the recipe that made it, or start a new --output")
    with torch.no_grad():
        for n, t in into.items():
            t.copy_(saved[n].to(t.dtype))


def _without_run_keys(recipe: dict) -> dict:
    """The parts of a recipe that must match to resume: all but the run length, checkpointing,
    logging and validation-render settings, where the moving average is kept and what of it is saved, where
    the disk cache is (they do not change what is learned) and the split of the global batch over processes (checked on
    its own). The held-out images must match: they decide what is trained on, and which step is best."""
    out = json.loads(json.dumps(recipe))
    for key in ("steps", "resume", "checkpoint_every", "keep_checkpoints", "keep_best", "skip_nonfinite", "log_with",
                "validation_prompt", "validation_every", "validation_steps", "num_processes", "batch_size",
                "ema_on_cpu", "save_ema", "cache_dir"):
        out.get("train", {}).pop(key, None)
    for section, key in (("data", "images"), ("dreambooth", "class_images"), ("train", "validation_images")):
        if isinstance(out.get(section, {}).get(key), str):  # one folder, however it was written (relative, ./, ..)
            out[section][key] = str(Path(out[section][key]).resolve())
    return out
