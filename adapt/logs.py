"""adapt's own progress bars and one-line logs only: the libraries' info chatter is hidden. And
the optional packages: deferred where the stack would import them for nothing (DEFERRED in every
command, RUN_DEFERRABLE for a training run that does not use them), checked where an option needs
one (`check_installed`: a one-line error with the pip command)."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

from .errors import AdaptError

LIBRARIES = ("bitsandbytes", "accelerate", "peft", "diffusers", "transformers", "huggingface_hub")


def quiet_libraries(loaded: bool = False) -> None:
    """Environment and logger levels (cheap, nothing imported: the CLI calls this first); with
    `loaded` (diffusers and transformers are in use), also their own verbosity and loading bars."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.ERROR)
    if loaded:
        for name in ("diffusers", "transformers"):
            library_logging = importlib.import_module(f"{name}.utils.logging")
            library_logging.set_verbosity_error()
            library_logging.disable_progress_bar()


DEFERRED = {  # hidden from the stack in every command: adapt uses them for one option or never
    "bitsandbytes": "diffusers, peft and transformers import it, with its kernels, for quantized loading; "
                    "only --optimizer adamw8bit uses it (seconds of every start)",
    "boto3": "accelerate imports it for its SageMaker config, which adapt never uses (~0.1 s)",
}
RUN_DEFERRABLE = {  # hidden for a training run that does not use them (plan.unused_packages)
    "scipy": "transformers imports it for object-detection losses, diffusers for beta-sigma samplers; "
             "only the lms sampler uses it (~1 s of every start)",
}
STACK = ("diffusers", "transformers", "peft", "accelerate")  # they decide at import what is installed
_OWN_PROCESS = {"on": False}


def defer_optional_imports() -> None:
    """Hide the DEFERRED packages from the stack before it loads (a None in sys.modules reads as
    "not installed"); `optional_import` brings one back (bitsandbytes for --optimizer adamw8bit)."""
    for name in DEFERRED:
        sys.modules.setdefault(name, None)


def mark_own_process() -> None:
    """The console script (`adapt ...`, `python -m adapt`): this process runs one command, then exits."""
    _OWN_PROCESS["on"] = True


def defer_for_this_run(unused) -> None:
    """Hide the RUN_DEFERRABLE packages in `unused` from the stack, only where that cannot surprise
    a later caller: in a process of its own (mark_own_process) and before the stack loads. The
    libraries read "not installed" once, at import, and keep it for the life of the process (a
    pytest or notebook process that later renders with lms would find it missing)."""
    if _OWN_PROCESS["on"] and not any(lib in sys.modules for lib in STACK):
        for name in unused:
            sys.modules.setdefault(name, None)


def optional_import(name: str):
    """Import an optional package, also one `defer_optional_imports` hid (ImportError if absent)."""
    if name in sys.modules and sys.modules[name] is None:
        del sys.modules[name]
    return importlib.import_module(name)


def check_installed(module: str, option: str, extra: str | None = None) -> None:
    """`option` needs the optional package `module`: when it is not installed (looked up, not imported),
    a one-line error with the pip command (and the adapt extra that holds it)."""
    if importlib.util.find_spec(module) is None:
        also = f' (or pip install "{extra}")' if extra else ""
        raise AdaptError(f"{option} needs the {module} package, which is not installed: pip install {module}{also}")
