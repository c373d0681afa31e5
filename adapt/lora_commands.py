"""The LoRA tools' commands (merge, convert, extract, resize): typer signatures, argument checks
(torch-free, checks.py) and a lazy import of each body (lora_tools.py, extract.py). cli.py
registers them on the app, in this order, with its error handling. Light.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .checks import check_lora_file_output, check_lora_output, check_merge_args, check_rank_energy, default_output, lora_specs, parse_targets
from .config import check_lora_format
from .errors import AdaptError
from .models import resolve_model
from .options import AllowPickle, Lenient, Lora, Model, Overwrite, Replace

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
    check_lora_file_output(output, overwrite)
    from .lora_tools import convert as convert_lora  # lazy: loads torch (a command's body)

    convert_lora(file, to, output, allow_pickle, lenient)


@command("""Extract a LoRA from a fine-tuned model folder (DreamBooth, merge --into-model): per module, the rank-R SVD of W_tuned - W_base.

\b
Prints the relative error ||dW - dW_r|| / ||dW|| over all modules at ranks 1, 2, 4, ... and the
share of the UNet's change the targeted modules hold (the rest, e.g. resnets, feed-forward and
norms, is not in the LoRA). Modules that did not change are left out.

\b
Examples:
  adapt extract --model outputs/cat-db --rank 16 --output outputs/cat-db-r16
  adapt extract --model outputs/cat-db --base bundled --rank 8 --targets q,k,v,out,ff.net.0.proj,ff.net.2 \\
      --format kohya --output cat-db-r8.safetensors
""")
def extract(model: Annotated[str, typer.Option(help="The fine-tuned diffusers pipeline folder (e.g. a DreamBooth run folder).")],
            base: Annotated[Optional[str], typer.Option(help="The model it was fine-tuned from: a folder, a cached hub id or 'bundled'. Default: the bundled base model.")] = None,
            rank: Annotated[int, typer.Option(help="LoRA rank R (a module smaller than R keeps its own rank).")] = 16,
            targets: Annotated[str, typer.Option(help="Modules to extract: UNet attention projections q,k,v,out, or module names (to_q, ff.net.0.proj, proj_in); every module whose path ends with one.")] = "q,k,v,out",
            text_encoder: Annotated[bool, typer.Option(help="Also extract the text encoder(s)' q,k,v,out (q_proj, ...). Without it, a warning says when they changed.")] = False,
            output: Annotated[Optional[Path], typer.Option(help="A .safetensors file (one layout), or a folder for both files a LoRA run writes. Default: outputs/extract-<timestamp>.")] = None,
            format: Annotated[Optional[str], typer.Option("--format", help="diffusers, kohya or both. Default: both for a folder, diffusers for a .safetensors file.")] = None,
            overwrite: Replace = False):
    output = output or default_output("extract")
    check_rank_energy(rank, None)
    check_lora_output(output, format, overwrite)
    names = parse_targets(targets)
    for folder in (model, base):
        resolve_model(folder)  # a missing or incomplete folder: one line, before torch loads
    from .extract import extract_lora  # lazy: loads torch (a command's body)

    typer.echo("\n".join(extract_lora(model, base, output, rank, names, text_encoder, format)))


@command("""Resize a LoRA to a lower rank: per module, the best rank-R approximation of its update (SVD).

\b
--rank R keeps R per module. --energy F keeps, per module, the smallest rank whose singular values
hold the fraction F of its sum(s^2) (relative error <= sqrt(1 - F)); ranks then vary by module,
which kohya files hold natively and diffusers files in peft's rank_pattern. Both: --rank caps the
--energy ranks. Prints the relative error, the modules with the largest errors and the file sizes.

\b
Examples:
  adapt resize outputs/cat-lora/pytorch_lora_weights.safetensors --rank 2 --output cat-r2.safetensors
  adapt resize cat.safetensors --energy 0.9 --format kohya --output cat-e90.safetensors
""")
def resize(file: Annotated[Path, typer.Argument(help="The LoRA file to resize (either layout).")],
           output: Annotated[Path, typer.Option(help="A .safetensors file (one layout), or a folder for both files a LoRA run writes.")],
           rank: Annotated[Optional[int], typer.Option(help="Rank R of every module (with --energy: the most any module keeps).")] = None,
           energy: Annotated[Optional[float], typer.Option(help="Per module, keep the smallest rank holding this fraction of sum(s^2), in (0, 1].")] = None,
           format: Annotated[Optional[str], typer.Option("--format", help="diffusers, kohya or both. Default: the input's layout for a .safetensors file, both for a folder.")] = None,
           overwrite: Replace = False, allow_pickle: AllowPickle = False, lenient: Lenient = False):
    check_rank_energy(rank, energy)
    if not file.is_file():
        raise AdaptError(f"LoRA file {file} not found")
    check_lora_output(output, format, overwrite)
    from .lora_tools import resize as resize_lora  # lazy: loads torch (a command's body)

    typer.echo("\n".join(resize_lora(file, output, format, rank, energy, allow_pickle, lenient)))
