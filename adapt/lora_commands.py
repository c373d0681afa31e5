"""The LoRA tools' commands (merge, convert): typer signatures, argument checks
(torch-free, checks.py) and a lazy import of each body (lora_tools.py). cli.py
registers them on the app, in this order, with its error handling. Light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .checks import check_merge_args, lora_specs
from .config import check_lora_format
from .errors import AdaptError
from .options import AllowPickle, Lenient, Lora, Model, Overwrite

LORA_COMMANDS: list = []  # (function, help text), in the order `adapt --help` lists them


def command(help: str):
    def register(fn):
        LORA_COMMANDS.append((fn, help))
        return fn

    return register


@command("""Combine LoRAs: into one LoRA file (exact weighted sum, or rank-R by SVD), or fused into a model folder.

\b
Examples:
  adapt merge --lora a.safetensors:0.7 --lora b.safetensors:0.4 --output ab.safetensors
  adapt merge --lora a.safetensors:0.7 --lora b.safetensors:0.4 --output ab8.safetensors --rank 8
  adapt merge --lora a.safetensors:0.8 --into-model outputs/model-with-a
""")
def merge(lora: Lora = None,
          output: Annotated[Optional[Path], typer.Option(help="Write ONE LoRA file: sum_i w_i * (alpha_i/r_i) * B_i A_i (ranks concatenated).")] = None,
          into_model: Annotated[Optional[Path], typer.Option(help="Write a diffusers model folder with the LoRAs fused into its weights.")] = None,
          model: Model = None,
          rank: Annotated[Optional[int], typer.Option(help="With --output: approximate the sum at this rank by SVD and print the relative error.")] = None,
          format: Annotated[str, typer.Option("--format", help="Layout of --output: diffusers or kohya.")] = "diffusers",
          overwrite: Overwrite = False, allow_pickle: AllowPickle = False, lenient: Lenient = False):
    loras = lora_specs(lora)
    check_merge_args(loras, output, into_model, rank, overwrite)
    if output is not None:
        check_lora_format(format)
        from .lora_tools import merge_to_file  # lazy: loads torch (a command's body)

        err = merge_to_file(loras, output, format, rank, allow_pickle, lenient)
        if rank is not None:
            typer.echo(f"rank {rank}: relative error ||dW - dW_r|| / ||dW|| = {err:.6f}")
        return
    from .lora_tools import merge_into_model  # lazy: loads torch (a command's body)

    merge_into_model(loras, model, into_model, allow_pickle, lenient)


@command("""Convert a LoRA file between the diffusers/peft and kohya/A1111/ComfyUI layouts.

\b
Kohya-layout SDXL files name UNet blocks as Stability does (input_blocks / middle_block /
output_blocks), as kohya's trainer writes them; the reader takes either block naming.

\b
Example:
  adapt convert outputs/cat-lora/pytorch_lora_weights.safetensors --to kohya --output cat.safetensors
""")
def convert(file: Annotated[Path, typer.Argument(help="The LoRA file to convert (either layout).")],
            to: Annotated[str, typer.Option(help="Target layout: kohya or diffusers.")],
            output: Annotated[Path, typer.Option(help="Where to write the converted file.")],
            overwrite: Overwrite = False, allow_pickle: AllowPickle = False, lenient: Lenient = False):
    check_lora_format(to)
    if not file.is_file():
        raise AdaptError(f"LoRA file {file} not found")
    if output.exists() and not overwrite:
        raise AdaptError(f"{output} already exists; pass another --output or --overwrite to replace it")
    from .lora_tools import convert as convert_lora  # lazy: loads torch (a command's body)

    convert_lora(file, to, output, allow_pickle, lenient)

