"""adapt: fine-tune Stable-Diffusion-style text-to-image models (LoRA, DreamBooth, textual inversion).

Importing the package is cheap: torch, diffusers and friends are imported by the modules that need
them, so `adapt --help` and argument errors answer at once.
"""

__version__ = "0.1.0"
