"""Argument checks of the commands, run before anything heavy loads (torch-free): sampling
options, --lora/--embedding specs, eval's and merge's argument combinations, extract's and resize's
ranks and outputs, the default run folder."""

from __future__ import annotations

import time
from pathlib import Path

from .config import check_lora_format
from .errors import AdaptError
from .fileio import IMAGE_SUFFIXES
from .schedulers import check_scheduler


def default_output(kind: str) -> Path:
    """The one default run folder name: outputs/<kind>-<timestamp> (kind: a method or a command)."""
    return Path("outputs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_sampling(scheduler: str, steps: int, count: int, size: int | None) -> None:
    check_scheduler(scheduler)
    if count < 1 or steps < 1:
        raise AdaptError("--num-images and --steps must be >= 1")
    if size is not None and (size < 8 or size % 8):
        raise AdaptError(f"--size {size} must be a positive multiple of 8")


def parse_weighted(spec: str) -> tuple[str, float]:
    """'path/to/file.safetensors:0.8' -> (path, 0.8); no ':weight' means weight 1."""
    path, sep, weight = spec.rpartition(":")
    if sep and path:
        try:
            return path, float(weight)
        except ValueError:
            pass  # a ':' that is part of the path
    return spec, 1.0


def parse_embedding(spec: str) -> tuple[str, str | None]:
    """'file.safetensors:<token>' -> (file, '<token>'); a bare file keeps the token stored in it."""
    if Path(spec).is_file():
        return spec, None
    path, sep, token = spec.rpartition(":")
    return (path, token or None) if sep and path else (spec, None)


def lora_specs(specs: list[str] | None) -> list[tuple[str, float]]:
    """--lora FILE[:WEIGHT] values -> [(file, weight)], each file existing."""
    loras = [parse_weighted(s) for s in (specs or [])]
    for path, _ in loras:
        if not Path(path).is_file():
            raise AdaptError(f"LoRA file {path} not found; pass FILE[:WEIGHT] with an existing .safetensors file")
    return loras


def embedding_specs(specs: list[str] | None) -> list[tuple[str, str | None]]:
    """--embedding FILE[:TOKEN] values -> [(file, token or None)], each file existing."""
    out = [parse_embedding(s) for s in (specs or [])]
    for path, _ in out:
        if not Path(path).is_file():
            raise AdaptError(f"embedding file {path} not found; pass FILE[:TOKEN] with an existing .safetensors file")
    return out


def list_images(folder: str | Path, flag: str = "--images") -> list[Path]:
    """The images of a folder (a `name.mask.png` beside `name.png` is that image's loss mask, masks.py); a missing,
    empty or wrong `flag` folder is a one-line error, before anything heavy loads."""
    folder = Path(folder)
    if not folder.exists():
        raise AdaptError(f"{flag} {folder} does not exist; pass the folder that holds the images")
    if not folder.is_dir():
        raise AdaptError(f"{flag} {folder} is a file; pass the folder that holds the images")
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")]
    stems = {p.stem for p in files}
    images = sorted(p for p in files if not (p.name.endswith(".mask.png") and p.name[:-len(".mask.png")] in stems))
    if not images:
        raise AdaptError(f"{flag} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it; put the images there")
    return images


def check_eval_args(prompts, prompt, batch_size: int, limit, folders: dict) -> None:
    """eval: one prompt source, sizes >= 1, --refs-b only beside --refs, every folder a folder."""
    if (prompts is None) == (not prompt):
        raise AdaptError("pass either --prompts FILE or --prompt TEXT (one or more)")
    if batch_size < 1 or (limit is not None and limit < 1):
        raise AdaptError("--batch-size and --limit must be >= 1")
    if folders.get("--refs-b") is not None and folders.get("--refs") is None:
        raise AdaptError("--refs-b needs --refs (the first style's references)")
    for flag, dirs in folders.items():
        for folder in dirs if isinstance(dirs, (list, tuple)) else [dirs]:
            if folder is not None and not Path(folder).is_dir():
                raise AdaptError(f"{flag} {folder} is not a folder; pass a folder of images")
    if folders.get("--set") is not None:
        list_images(folders["--set"], "--set")  # an empty one: said now, not after every image is rendered


def check_merge_args(loras: list, output, into_model, rank, overwrite: bool) -> None:
    """merge: something to merge, exactly one target, not over an existing path, --rank only for a file."""
    if not loras:
        raise AdaptError("nothing to merge; pass --lora FILE[:WEIGHT] (repeatable)")
    if (output is None) == (into_model is None):
        raise AdaptError("pass exactly one of --output FILE (a LoRA file) or --into-model DIR (a model folder)")
    if output is not None:
        check_lora_file_output(output, overwrite)
    else:
        check_output_folder(into_model, None, overwrite, "--into-model")
    if into_model is not None and rank is not None:
        raise AdaptError("--rank applies to --output (a LoRA file), not to --into-model")
    if rank is not None and rank < 1:
        raise AdaptError(f"--rank must be >= 1, got {rank}")


def check_lora_file_output(output: Path, overwrite: bool) -> None:
    """convert / merge --output: one .safetensors file, not over an existing one without --overwrite."""
    if output.is_dir():
        raise AdaptError(f"--output {output} is a folder; name the .safetensors file to write in it, e.g. {output / 'lora.safetensors'}")
    if output.suffix.lower() != ".safetensors":
        raise AdaptError(f"--output {output}: name the .safetensors file to write, e.g. {output.with_suffix('.safetensors').name}")
    if output.exists() and not overwrite:
        raise AdaptError(f"{output} already exists; pass another --output or --overwrite to replace it")


def check_output_folder(output: Path, marker: str | None, overwrite: bool, flag: str = "--output") -> None:
    """A folder a command writes: not a file; one that holds `marker` (the file an earlier run of the command left;
    None: anything) is replaced only with --overwrite."""
    if output.exists() and not output.is_dir():
        raise AdaptError(f"{flag} {output} is a file; pass a folder")
    taken = (output / marker).exists() if marker else output.is_dir() and any(output.iterdir())
    if taken and not overwrite:
        what = f"already holds an earlier run's {marker}" if marker else "already exists"
        raise AdaptError(f"{output} {what}; pass another {flag} or --overwrite to replace it")


def check_rank_energy(rank: int | None, energy: float | None, need_one: bool = True) -> None:
    """extract / resize: --rank >= 1, --energy in (0, 1]; resize needs one of them."""
    if need_one and rank is None and energy is None:
        raise AdaptError("pass --rank R or --energy F (or both: --rank caps the ranks --energy picks)")
    if rank is not None and rank < 1:
        raise AdaptError(f"--rank must be >= 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise AdaptError(f"--energy must be in (0, 1], the fraction of each module's sum(s^2) to keep; got {energy}")


def check_lora_output(output: Path, fmt: str | None, overwrite: bool) -> None:
    """extract / resize: --format a LoRA layout or both (two files: --output a folder), a folder
    --output not an existing file, and nothing overwritten without --overwrite."""
    if fmt is not None:
        check_lora_format(fmt, "both")
    is_file = output.suffix == ".safetensors"
    if fmt == "both" and is_file:
        raise AdaptError(f"--format both writes two files; pass a folder as --output (not {output}) or --format diffusers|kohya")
    if not is_file and output.is_file():
        raise AdaptError(f"--output {output} is a file; name a .safetensors file or a folder for the LoRA files")
    if output.exists() and not overwrite:
        raise AdaptError(f"{output} already exists; pass another --output or --overwrite to replace it")


def parse_targets(targets: str) -> list[str]:
    """'q,k,v,out' -> ['q', 'k', 'v', 'out'] (extract's --targets, as training's)."""
    out = [t.strip() for t in targets.split(",") if t.strip()]
    if not out:
        raise AdaptError("--targets is empty; choose from q,k,v,out or module names such as to_q, ff.net.0.proj")
    return out
