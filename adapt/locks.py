"""One writer per folder: a run folder, or a class-image cache shared by several runs.

The lock is an exclusive `flock` on FOLDER/.adapt.lock, a file that also holds the holder's PID
and host (for the messages only). The kernel drops a flock when its process dies, however it
dies, so a lock left by a killed run is stale by construction: the next run takes it over and
says whose it was. The file is removed on release; a process that opened it just before that
sees another inode at the path and tries again, so two processes never both hold the lock.
Unix only (fcntl); on a network filesystem this is as good as its flock emulation.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import AdaptError
from .fileio import RECIPE_FILE, has_checkpoints, run_entries

log = logging.getLogger("adapt")
LOCK_FILE = ".adapt.lock"


class FolderLock:
    """`with FolderLock(folder, "a training run"):` holds the folder; wait=False refuses at once
    when another live process holds it, wait=True waits for it (saying for whom). A folder the lock
    created is removed again on exit if nothing was written into it (a run that failed at set-up)."""

    def __init__(self, folder: str | os.PathLike, what: str, wait: bool = False):
        self.folder, self.what, self.wait = Path(folder), what, wait
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "FolderLock":
        self.created = [d for d in (self.folder, *self.folder.parents) if not d.exists()]  # the folder first
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)  # in the loop: a holder that created it removes it when empty
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(_read(fd))
                if not self.wait:
                    os.close(fd)
                    raise AdaptError(f"{self.folder} is in use by {holder}, {self.what}; wait for it to finish, stop it, "
                                     "or choose another folder") from None
                log.info("waiting for %s, which is writing %s in %s", holder, self.what, self.folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder removed the file as we opened it: lock the new one
        before = _read(fd)
        if before.get("pid") and before != _me():
            log.warning("%s: took over the lock of %s, which is no longer running (a killed run)", self.folder,
                        _describe(before))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            if _same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)
            os.close(self.fd)  # releases the flock
            self.fd = None
            for made in self.created:  # a run that failed before writing anything leaves no empty folder behind
                try:
                    made.rmdir()
                except OSError:  # not empty (or already gone): kept, and so are the folders above it
                    break


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname()}


def _read(fd: int) -> dict:
    try:
        value = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def _describe(holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host")
    return f"PID {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def remove_partial_files(folder: str | os.PathLike) -> int:
    """Delete what interrupted atomic writes left (`.NAME.*.tmp` files, `.NAME.*.partial` folders)
    in `folder` and one level below; only call it while holding the folder's lock."""
    folder, removed = Path(folder), 0
    if not folder.is_dir():
        return 0
    for leftover in [*folder.glob(".*.tmp"), *folder.glob(".*.partial"), *folder.glob("*/.*.tmp"), *folder.glob("*/.*.partial")]:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed += 1
    if removed:
        log.info("removed %d partial file(s) left in %s by an interrupted write", removed, folder)
    return removed


ASIDE = ".previous-run"  # --overwrite: the replaced run's files, until the run replacing them has finished


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def replacing(folder: Path, keep: frozenset[str], replace: bool):
    """A run in `folder` (`keep`: the entries holding what it reads, never touched), and with --overwrite (`replace`)
    the run it replaces: that run's files (fileio.run_entries; a user's other files stay) move into
    FOLDER/.previous-run while the new one trains. They are deleted once a run there has finished (its recipe
    written, no error), moved back if it failed without a checkpoint, and kept beside its checkpoints otherwise, so
    --resume can finish it. So two runs' files never mix, and a finished run is only deleted when another has
    finished in its place."""
    aside = folder / ASIDE
    if replace:
        if aside.exists() and (folder / RECIPE_FILE).exists():
            _remove(aside)  # the run there finished, but was stopped before it removed the one it replaced
        fresh = not aside.exists()  # else it holds the last finished run, and the folder an abandoned replacement
        aside.mkdir(exist_ok=True)
        for entry in _owned(folder, keep):
            if fresh:
                entry.rename(aside / entry.name)
            else:
                _remove(entry)
    finished = False
    try:
        yield
        finished = (folder / RECIPE_FILE).exists()
    except SystemExit as stop:  # --num-processes: the launcher's exit code is the workers' result
        finished = stop.code in (0, None) and (folder / RECIPE_FILE).exists()
        raise
    finally:
        _settle(folder, aside, keep, finished)


def _owned(folder: Path, keep: frozenset[str]) -> list[Path]:
    return [e for e in run_entries(folder) if e.name not in keep]


def _settle(folder: Path, aside: Path, keep: frozenset[str], finished: bool) -> None:
    """After a run: drop the replaced run's files, give them back, or keep them (replacing)."""
    if not aside.exists():
        return
    if finished:
        _remove(aside)
    elif not has_checkpoints(folder):
        for entry in _owned(folder, keep):
            _remove(entry)  # the failed run's few files: the old run comes back whole
        for entry in aside.iterdir():
            if (folder / entry.name).exists():
                _remove(folder / entry.name)  # a name only the old run had, so the failed run wrote it
            entry.rename(folder / entry.name)
        aside.rmdir()
        log.info("the run could not finish; the run it was replacing is back in %s", folder)
    else:
        log.warning("the run this one replaces is kept in %s until a run there finishes (--resume latest); move its "
                    "files back to undo the replacement", aside)


def held_elsewhere(folder: Path) -> bool:
    """True in a worker of `adapt --num-processes N`: its launcher holds the run folder's lock."""
    return os.environ.get("ADAPT_RUN_LOCK") == str(Path(folder).resolve())


@contextmanager
def run_folder(out: Path, inputs: frozenset[str] = frozenset(), replace: bool = False):
    """Hold the run folder `out` for this run (refused at once if a live run holds it) and clear
    what an interrupted run's atomic writes left there; `inputs`: its entries this run reads, `replace`:
    --overwrite of a run there (`replacing`). Workers of a multi-process run leave it to the process
    that launched them (or, under an outside launcher, to rank 0)."""
    if held_elsewhere(out) or int(os.environ.get("RANK", "0") or 0) != 0:
        yield
        return
    before = os.environ.get("ADAPT_RUN_LOCK")
    with FolderLock(out, "a training run"):
        remove_partial_files(out)
        os.environ["ADAPT_RUN_LOCK"] = str(Path(out).resolve())  # for the workers of --num-processes
        try:
            with replacing(Path(out), inputs, replace):
                yield
        finally:
            if before is None:
                os.environ.pop("ADAPT_RUN_LOCK", None)
            else:
                os.environ["ADAPT_RUN_LOCK"] = before
