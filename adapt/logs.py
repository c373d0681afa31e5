"""adapt's own progress bars and one-line logs only: the libraries' info chatter is hidden. And
the optional packages: deferred where the stack would import them for nothing, checked where an
option needs one (`check_installed`: a one-line error with the pip command)."""

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


DEFERRED = ("bitsandbytes",)  # only --optimizer adamw8bit uses it


def defer_optional_imports() -> None:
    """diffusers (and peft, transformers) import bitsandbytes, with its kernels, whenever it is
    installed: seconds of every start, for quantized loading adapt does not do. The CLI hides it
    from them before they load (a None in sys.modules reads as "not installed"); `optional_import`
    brings it back for --optimizer adamw8bit."""
    for name in DEFERRED:
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
