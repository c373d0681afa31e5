"""Atomic file writes: a file appears whole or not at all (write a temporary name, then rename).

What appears has the permissions of a plain new file under the user's umask (0644 files, 0755
folders under umask 022), whatever the writer did to the temporary name: mkstemp makes 0600
files, and safetensors replaces the file it writes with one of its own, 0600 too.

Also the one reader of weight files users hand us (`read_safetensors`) and the name of the recipe
file every run output carries (`RECIPE_FILE`), and where its checkpoints go. Nothing heavy at import.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import AdaptError
from .untrusted import check_safetensors

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")  # what counts as an image file
RECIPE_FILE = "recipe.json"  # the settings that made a run's output, beside it
CHECKPOINTS_DIR, CHECKPOINT_PREFIX = "checkpoints", "step-"  # a run's checkpoints: OUTPUT/checkpoints/step-000100/


# What a training run writes into its folder besides its .safetensors files and a pipeline's components (named in its
# model_index.json): recipe and report (formats, report), metrics and loss plot (train), validation grids and summary
# (validation), --save-ema both's raw/ (formats), --dataset's images (launch), tracker logs (run), textual inversion's
# a1111/ (embeddings). --overwrite moves exactly these aside (locks.replacing): a user's other files stay (and so do
# other files a pipeline run copied from its base, e.g. the bundled base's README.md; the next pipeline run copies its own).
RUN_FILES = (RECIPE_FILE, "report.md", "metrics.jsonl", "loss.png", "validation.json", "model_index.json", "adapt.json")
RUN_DIRS = (CHECKPOINTS_DIR, "validation", "raw", "dataset", "logs", "a1111")


def run_entries(run_dir: str | os.PathLike) -> list[Path]:
    """The entries of a run folder that a run wrote (RUN_FILES, RUN_DIRS, .safetensors files, pipeline components)."""
    run_dir = Path(run_dir)
    index = run_dir / "model_index.json"
    try:
        components = {k for k in json.loads(index.read_text()) if not k.startswith("_")} if index.is_file() else set()
    except (OSError, ValueError, AttributeError):
        components = set()
    names = {*RUN_FILES, *RUN_DIRS, *components}
    return sorted(e for e in run_dir.iterdir() if e.name in names or (e.suffix == ".safetensors" and e.is_file()))


def list_checkpoints(root: Path) -> list[Path]:
    """The checkpoint folders under `root` (OUTPUT/checkpoints; checkpoint.py writes them), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and (p / "loop.json").is_file())


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether a run folder holds a checkpoint."""
    return bool(list_checkpoints(Path(run_dir) / CHECKPOINTS_DIR))


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        _disk_full(e, path)
        raise


def write_json(path: str | os.PathLike, obj) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder beside `path`; on success it replaces `path` (an old folder there is
    removed only after the new one is complete), on error it is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial"))
    try:
        yield tmp
        _usual_modes(tmp)
        if path.is_dir():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _disk_full(e, path)
        raise


def _disk_full(error: BaseException, path: Path) -> None:
    """Out of space (or quota) while writing: one clear line; the partial file is already gone
    and whatever was at `path` before is untouched."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise AdaptError(f"no space left on the device while writing {path}; nothing was replaced. "
                         "Free some space (or choose another --output) and run again (--resume latest continues a run)") from None


def _usual_modes(folder: Path) -> None:
    """Every folder and plain file under `folder` (itself included) gets the umask's default mode."""
    mask = _umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for f in files:
            if not os.path.islink(os.path.join(root, f)):
                os.chmod(os.path.join(root, f), 0o666 & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


def read_safetensors(path: str | Path, what: str = "weights", allow_pickle: bool = False):
    """(tensors, metadata) of a .safetensors file, or a one-line error.

    Pickle files (.pt/.bin/.ckpt) are read only with allow_pickle (the user's --allow-pickle),
    with a warning, and even then through torch.load(weights_only=True): tensors, numbers and
    strings only, never arbitrary objects. Nested dicts (A1111 embeddings) are flattened with '.'.
    """
    from safetensors import SafetensorError, safe_open  # lazy: LIGHT module (plan imports it before argument errors)

    path = Path(path)
    if not path.is_file():
        raise AdaptError(f"{what} file {path} not found")
    try:
        check_safetensors(path)  # a crafted or truncated header: a ValueError naming the tensor, nothing allocated
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        reason = str(e)
    if not allow_pickle:
        hint = (" It looks like a pickle file: convert it to safetensors, or pass --allow-pickle if you trust"
                " where it came from (pickle files can run code).") if path.suffix.lower() in PICKLE_SUFFIXES else ""
        raise AdaptError(f"{path} is not a readable .safetensors {what} file ({reason}); adapt reads safetensors only.{hint}")
    import torch  # lazy: LIGHT module (plan imports it before argument errors)

    logging.getLogger("adapt").warning("--allow-pickle: reading pickle file %s (tensors only, weights_only=True); "
                                       "only do this for files you trust", path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure: corrupt file or objects that weights_only refuses
        raise AdaptError(f"{path} is neither safetensors nor a tensors-only pickle ({str(e).splitlines()[0][:160]})") from None
    if isinstance(obj, torch.Tensor):
        obj = {"emb_params": obj}
    flat: dict = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", obj)
    meta = {"adapt.pickle": "1"}
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        meta["adapt.pickle_name"] = obj["name"]
    return flat, meta
