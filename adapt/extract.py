"""The body of `adapt extract`: a LoRA from the difference between a fine-tuned pipeline folder
(DreamBooth, `merge --into-model`) and its base, by truncated SVD of each targeted module's
W_tuned - W_base (lowrank.py). Weights are read tensor by tensor from the folders' safetensors
files, so memory holds one module at a time and the kept singular vectors. Arguments are checked
by the caller."""

from __future__ import annotations

import json
import logging
import math
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open

from .config import LORA_TARGET_ALIASES
from .errors import AdaptError
from .estimate import read_header
from .formats import write_lora_outputs
from .lora_names import TEXT_ENCODERS, is_module_key, module_key
from .lowrank import dense_spectrum, rank_table, relative_error, worst_modules
from .models import is_sdxl_folder, resolve_model

log = logging.getLogger("adapt")

TEXT_TARGET_ALIASES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "out": "out_proj"}


def weight_files(folder: Path, component: str) -> dict[str, tuple[Path, str, list[int]]]:
    """{module key + '.weight' or other tensor name: (file, name in the file, shape)} of one
    component's safetensors weights (the plain files when a variant such as fp16 sits beside them)."""
    files = sorted((folder / component).glob("*.safetensors"))
    files = [f for f in files if "." not in f.name.removesuffix(".safetensors")] or files
    if not files:
        raise AdaptError(f"{folder / component} has no .safetensors weights; adapt extract reads safetensors only")
    out = {}
    for f in files:
        for name, (shape, _) in read_header(f).items():
            out[module_key(component, name)] = (f, name, shape)
    return out


def _check_same_architecture(model: Path, base: Path, component: str, tuned: dict, orig: dict) -> None:
    differ = sorted(k for k in tuned.keys() | orig.keys() if k not in tuned or k not in orig or tuned[k][2] != orig[k][2])
    if differ:
        k = differ[0]
        shapes = " vs ".join(str(w[k][2]) if k in w else "missing" for w in (tuned, orig))
        raise AdaptError(f"--model {model} and --base {base} are not the same architecture ({component}: {len(differ)} "
                         f"tensors differ, e.g. {k.split('.', 1)[1]}: {shapes}); pass the base it was fine-tuned from")


def select(keys, component: str, targets: list[str]) -> list[str]:
    """Module keys of `component` whose path is a target (q,k,v,out or a module name) or ends with one."""
    aliases = LORA_TARGET_ALIASES if component == "unet" else TEXT_TARGET_ALIASES
    names = [aliases.get(t, t) for t in targets]
    out = []
    for key in keys:
        module = key.removesuffix(".weight")
        path = module.split(".", 1)[1]
        if key.endswith(".weight") and is_module_key(module) and any(path == t or path.endswith("." + t) for t in names):
            out.append(module)
    return sorted(out)


def _tensor(stack: ExitStack, handles: dict, entry) -> torch.Tensor:
    file, name, _ = entry
    if file not in handles:
        handles[file] = stack.enter_context(safe_open(str(file), framework="pt"))
    return handles[file].get_tensor(name)


def _differences(model: Path, base: Path, component: str, tuned: dict, orig: dict, wanted: set, rank: int,
                 stop_at_first: bool = False) -> tuple[dict, float, float]:
    """(spectra of the wanted modules that changed, their squared change, the component's total
    squared change); `stop_at_first`: only whether anything changed (total > 0 at the first change)."""
    spectra, part, total = {}, 0.0, 0.0
    with ExitStack() as stack:
        handles: dict = {}
        for key in sorted(tuned):
            a, b = _tensor(stack, handles, tuned[key]), _tensor(stack, handles, orig[key])
            if not a.is_floating_point():
                continue
            delta = a.float() - b.float()
            sq = float((delta.double() ** 2).sum())
            if not math.isfinite(sq):
                raise AdaptError(f"{component} tensor {tuned[key][1]} of --model {model} or --base {base} holds NaN or inf")
            total += sq
            if stop_at_first and sq > 0:
                break
            module = key.removesuffix(".weight")
            if module in wanted and sq > 0:
                spectra[module], part = dense_spectrum(delta, rank), part + sq
    return spectra, part, total


def extract_lora(model: str, base: str | None, output: Path, rank: int, targets: list[str], text_encoder: bool,
                 fmt: str | None) -> list[str]:
    """Write the rank-`rank` LoRA of model - base for the targeted modules; returns the report lines
    (modules, their share of the change, relative error per rank, the worst modules)."""
    model_dir, base_dir = resolve_model(model), resolve_model(base)
    sdxl = is_sdxl_folder(model_dir)
    if sdxl != is_sdxl_folder(base_dir):
        raise AdaptError(f"--model {model_dir} and --base {base_dir} are not the same architecture (one is SDXL)")
    components = ["unet", *(c for c in TEXT_ENCODERS if (model_dir / c).is_dir())]
    files = {c: (weight_files(model_dir, c), weight_files(base_dir, c)) for c in components}
    for c, (tuned, orig) in files.items():
        _check_same_architecture(model_dir, base_dir, c, tuned, orig)
    wanted = {c: select(files[c][0], c, targets) for c in components if c == "unet" or text_encoder}
    missing = [c for c, keys in wanted.items() if not keys]
    if missing:
        raise AdaptError(f"--targets {','.join(targets)} names no module of the {' or '.join(missing)}; "
                         "use q,k,v,out or module names such as to_q, ff.net.0.proj, proj_in")
    spectra, lines = {}, []
    log.info("comparing %s with %s (%d targeted modules)", model_dir, base_dir, sum(map(len, wanted.values())))
    for c, (tuned, orig) in files.items():
        if c not in wanted:
            if _differences(model_dir, base_dir, c, tuned, orig, set(), 1, stop_at_first=True)[2] > 0:
                log.warning("the %s of %s differs from the base's; pass --text-encoder to extract it too", c, model_dir)
            continue
        found, part, total = _differences(model_dir, base_dir, c, tuned, orig, set(wanted[c]), rank)
        spectra.update(found)
        share = f"{100 * part / total:.1f}%" if total > 0 else "none"
        lines.append(f"{c}: {len(found)} of {len(wanted[c])} targeted modules changed ({len(wanted[c]) - len(found)} "
                     f"unchanged, left out); they hold {share} of the {c}'s change (sum of squared differences)")
    if not spectra:
        raise AdaptError(f"no targeted module of --model {model_dir} differs from --base {base_dir}; "
                         "is that the base it was fine-tuned from? (or widen --targets)")
    ranks = {k: min(rank, sp.s.shape[0]) for k, sp in spectra.items()}
    err = relative_error(spectra, ranks)
    lines += rank_table(spectra, rank) + [f"largest relative errors at rank {rank}:", *worst_modules(spectra, ranks)]
    meta = {"adapt.extract": json.dumps({"model": str(model_dir), "base": str(base_dir), "rank": rank, "targets": targets,
                                         "text_encoder": text_encoder, "relative_error": err}, sort_keys=True)}
    written = write_lora_outputs(output, {k: sp.lora(ranks[k]) for k, sp in spectra.items()}, fmt, meta, sdxl)
    lines.append(f"wrote {', '.join(map(str, written))} (rank {rank}, relative error {err:.6f})")
    return lines
