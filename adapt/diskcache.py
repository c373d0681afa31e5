"""The training caches kept on disk between runs: VAE latents and text-encoder outputs, one
safetensors file per entry, named by the sha256 of everything that made it (encode.py says what
that is for each cache). A second run on the same data reads instead of encoding; any change to
an input gives another name, so an entry is never used for inputs other than its own.

Entries are written atomically (temporary name, then rename): a killed run leaves whole entries
or none. An unreadable entry is encoded again with a warning; a folder that cannot be written is
read from and warned about once. The folder: --cache-dir, else $ADAPT_CACHE_DIR, else
$XDG_CACHE_HOME/adapt, else ~/.cache/adapt. Deleting it at any time is safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import save_file

from . import __version__
from .errors import AdaptError
from .fileio import atomic_path, read_safetensors

log = logging.getLogger("adapt")
FORMAT = 1  # bump when what an entry holds, or how its inputs are prepared, changes without its key saying so


def cache_root(cache_dir: str | None) -> Path:
    """The disk cache folder: `cache_dir`, else $ADAPT_CACHE_DIR, else $XDG_CACHE_HOME/adapt, else ~/.cache/adapt."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get("ADAPT_CACHE_DIR"):
        return Path(os.environ["ADAPT_CACHE_DIR"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "adapt"


def digest(*chunks) -> str:
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def fingerprint(module) -> str:
    """sha256 of a module's class, architecture config and every state-dict tensor (name, dtype,
    shape, bytes) as it is now: on the device and in the dtype it encodes with."""
    h = hashlib.sha256()
    config = getattr(module, "config", {})
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    arch = {k: v for k, v in config.items()  # paths, library versions and dtype notes are not architecture
            if not k.startswith("_") and k not in ("name_or_path", "transformers_version", "torch_dtype", "dtype")}
    h.update(json.dumps([type(module).__name__, arch], sort_keys=True, default=str).encode())
    for name, t in module.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


class DiskCache:
    """One kind of entry ("latents", "text") under the cache folder, with counts of what was read."""

    def __init__(self, root: Path, kind: str, device):
        self.root, self.kind, self.device = Path(root), kind, device
        self.writable, self.hits, self.lookups = True, 0, 0
        # What every entry also depends on: the code that made it and where it ran.
        self.environment = {"format": FORMAT, "adapt": __version__, "torch": torch.__version__,
                            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
                            "device": torch.device(device).type}

    def key(self, **inputs) -> str:
        return digest(json.dumps({"kind": self.kind, **self.environment, **inputs}, sort_keys=True).encode())

    def path(self, key: str) -> Path:
        return self.root / self.kind / key[:2] / f"{key}.safetensors"

    def load(self, key: str, names: tuple[str, ...]) -> dict[str, torch.Tensor] | None:
        """The entry's tensors on the device, or None when there is none (or it is unreadable: a
        warning, and the caller encodes again and replaces it)."""
        self.lookups += 1
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            tensors, meta = read_safetensors(path, "cache entry")
        except AdaptError as e:
            log.warning("ignoring unreadable %s cache entry (%s); encoding again", self.kind, e)
            return None
        if meta.get("adapt.key") != key or set(tensors) != set(names):
            log.warning("ignoring %s cache entry %s: it does not hold what its name says; encoding again", self.kind, path)
            return None
        self.hits += 1
        return {k: v.to(self.device) for k, v in tensors.items()}

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write an entry atomically; when the folder cannot be written, warn once and go on without."""
        if not self.writable:
            return
        try:
            with atomic_path(self.path(key)) as tmp:
                save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                          metadata={"adapt.key": key})
        except (OSError, AdaptError) as e:
            self.writable = False
            log.warning("cannot write the %s disk cache in %s (%s); this run goes on without writing it",
                        self.kind, self.root, e)

    def report(self) -> None:
        log.info("%s: %d of %d from the disk cache %s", self.kind, self.hits, self.lookups, self.root)
