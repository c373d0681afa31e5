"""Checks on files from elsewhere (downloaded LoRAs and embeddings, model folders, datasets).

A broken or hostile file becomes a one-line error that names the file and what is wrong, found
before anything large is allocated and before any code shipped with the file could run:

* safetensors: only the header is read (at most the format's 100 MB), and every tensor's dtype,
  shape and byte range is checked against the file's real size, so a header that declares
  gigabytes, or offsets past the end, never reaches an allocation;
* tensors: NaN/inf values, and LoRA down (A) / up (B) weights whose ranks disagree;
* model folders: configs that ask to run code shipped with the model (`auto_map`, a custom
  pipeline class, a component whose module is a .py file in the folder);
* captions over MAX_CAPTION_BYTES; images over PIL's decompression-bomb limit (checked on the
  header, before decoding).

Nothing here imports torch at module level.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

from .errors import AdaptError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors format's own limit
MAX_CAPTION_BYTES = 64 * 1024  # a caption is a sentence; CLIP reads 77 tokens of it
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E4M3FNUZ": 1, "F8_E5M2": 1, "F8_E5M2FNUZ": 1,
               "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
               "F64": 8, "C64": 8}
LIBRARIES = ("diffusers", "transformers")


class BadFile(ValueError):
    """A file that is not what it claims to be; the message is the reason, without the path."""


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def check_safetensors(path: str | Path) -> None:
    """Raise BadFile when the header of `path` is not a sane safetensors header for this file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFile(f"{size} bytes, too short for a safetensors header")
        n = struct.unpack("<Q", head)[0]
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise BadFile(f"its header claims {_size(n)} but the file holds {_size(size)}")
        try:
            header = json.loads(f.read(n))
        except ValueError:  # also UnicodeDecodeError
            raise BadFile("its header is not JSON") from None
    if not isinstance(header, dict):
        raise BadFile("its header is not a JSON object")
    data = size - 8 - n
    for name, info in header.items():
        if name != "__metadata__":
            problem = _tensor_problem(info, data)
            if problem:
                raise BadFile(f"tensor {name[:80]!r} {problem}")


def _tensor_problem(info, data: int) -> str | None:
    """What is wrong with one header entry, given the bytes of data the file really holds."""
    if not isinstance(info, dict):
        return "has a malformed header entry"
    shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
    ints = (lambda v: isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v))
    if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        return "has a malformed shape or byte range"
    begin, end = offsets
    if end > data:
        return f"ends at byte {end} but the file holds {_size(data)} of data (truncated, or a crafted header)"
    if dtype in DTYPE_BYTES:
        need = math.prod(shape) * DTYPE_BYTES[dtype]
        if need != end - begin:
            return f"declares shape {shape[:8]} {dtype} ({_size(need)}) but spans {_size(end - begin)} of the file"
    return None


def check_finite(tensors: dict, path, what: str) -> None:
    """A NaN/inf weight (a diverged run, a broken conversion) would silently turn every image black."""
    import torch  # lazy: LIGHT module (fileio and models use it before argument errors)

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise AdaptError(f"{what} file {path}: tensor {name!r} holds NaN or inf values; the file is broken "
                             "(a diverged training run?): use another file")


def check_lora_pair(key: str, down, up, path) -> None:
    """down (A) is [r, in] (or [r, in, kh, kw]), up (B) is [out, r] (or [out, r, 1, 1]): the same r."""
    if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != up.shape[1]:
        raise AdaptError(f"LoRA file {path}: module {key} has down (A) weight {list(down.shape)} and up (B) weight "
                         f"{list(up.shape)}, whose ranks disagree; the file is broken or crafted: use another file")
    check_finite({f"{key} down": down, f"{key} up": up}, path, "LoRA")


def check_model_folder_files(folder: Path) -> None:
    """A model folder may hold configs and weights, never code: refuse configs that ask to run code
    shipped with the folder, and weights files whose safetensors header is broken."""
    index = _json(folder / "model_index.json")
    reason = None
    if not isinstance(index.get("_class_name"), str) or {"custom_pipeline", "auto_map"} & index.keys():
        reason = "model_index.json names a custom pipeline"
    for name, entry in index.items():
        if not name.startswith("_") and isinstance(entry, list) and len(entry) == 2 and entry[0] not in (None, *LIBRARIES):
            lib = str(entry[0])
            if not lib.isidentifier() or (folder / f"{lib}.py").exists() or (folder / name / f"{lib}.py").exists():
                reason = f"model_index.json loads {name} from the module {lib!r} shipped with the model"
    for config in sorted(folder.glob("*/config.json")):
        if "auto_map" in _json(config):
            reason = f"{config.parent.name}/config.json has auto_map (trust_remote_code)"
    if reason:
        raise AdaptError(f"model folder {folder} asks to run its own code ({reason}); adapt never runs code from a "
                         "model folder: use a folder of standard diffusers/transformers components")
    for weights in sorted(folder.glob("*/*.safetensors")):
        try:
            check_safetensors(weights)
        except BadFile as e:
            raise AdaptError(f"model folder {folder}: {weights.relative_to(folder)} is not a valid safetensors file "
                             f"({e}); re-download or rebuild the model") from None


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdaptError(f"{path} is not readable JSON ({str(e).splitlines()[0][:120]}); fix or re-download the model") from None
    if not isinstance(value, dict):
        raise AdaptError(f"{path} is not a JSON object; fix or re-download the model")
    return value


def read_caption(path: Path) -> str:
    """A caption file's text; one far larger than any caption is refused before it is read."""
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise AdaptError(f"caption file {path} is {_size(size)}; a caption is a sentence (at most "
                         f"{_size(MAX_CAPTION_BYTES)}): fix or remove it")
    return path.read_text().strip()


def check_caption(text: str, where: str) -> str:
    if len(text.encode()) > MAX_CAPTION_BYTES:
        raise AdaptError(f"the caption of {where} is {_size(len(text.encode()))}; a caption is a sentence (at most "
                         f"{_size(MAX_CAPTION_BYTES)}): fix it")
    return text


def check_pixels(img, path) -> None:
    """Before decoding: an image above PIL's decompression-bomb limit (PIL itself only warns up to
    twice the limit, and decodes) is refused, as PIL refuses larger ones."""
    from PIL import Image  # lazy: LIGHT module (fileio and models use it before argument errors)

    limit = Image.MAX_IMAGE_PIXELS
    if limit and img.width * img.height > limit:
        raise Image.DecompressionBombError(
            f"{img.width}x{img.height} pixels, above PIL's decompression-bomb limit of {limit} pixels; downscale it")
