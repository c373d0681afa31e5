"""Atomic file writes: a file appears whole or not at all (write a temporary name, then rename).

What appears has the permissions of a plain new file under the user's umask (0644 files, 0755
folders under umask 022), whatever the writer did to the temporary name: mkstemp makes 0600
files, and safetensors replaces the file it writes with one of its own, 0600 too.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


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
    import shutil

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
        from .errors import AdaptError

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
