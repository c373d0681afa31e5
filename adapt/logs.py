"""adapt's own progress bars and one-line logs only: the libraries' info chatter is hidden."""

from __future__ import annotations

import importlib
import logging
import os

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
