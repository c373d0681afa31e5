"""The commands' options: those of the training commands generated from the config fields of the
sections their method reads (adapt.config and adapt.train_config via adapt.recipe.SECTIONS, adapt.methods.METHODS), so
each option is declared once, and the options several commands share. cli.py gives them to typer.
Light: nothing heavy is imported.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Annotated, List, Optional

import typer

from .methods import MethodSpec
from .recipe import SECTIONS, field_help

Model = Annotated[Optional[str], typer.Option(help="Base model: a diffusers folder or a cached hub id. Default: the bundled emoji base model.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a finished run already in --output.")]
Replace = Annotated[bool, typer.Option(help="Replace an existing --output.")]
Lora = Annotated[Optional[List[str]], typer.Option(help="LoRA file with optional weight, FILE[:WEIGHT]; repeat for several.")]
Lenient = Annotated[bool, typer.Option(help="Leave out LoRA keys that fit no module (of the model, or of any SD/SDXL model) with a warning, instead of stopping.")]
AllowPickle = Annotated[bool, typer.Option(help="Also read pickle LoRA/embedding files (.pt/.bin/.ckpt), tensors only, with a warning. Only for files you trust.")]


def _option(section: str, f: dataclasses.Field, help: str | None):
    """The --name option of a config field (help from the field; `help` replaces it, {help} in it
    is the field's). None when not given, so a recipe's value (or the method's default) can stand."""
    flags = f.metadata.get("flags")
    base = str(f.type).split("|")[0].strip()
    help = field_help(section, f.name) if help is None else help.replace("{help}", field_help(section, f.name))
    if base == "bool":
        flag = f.name.replace("_", "-")
        return Annotated[Optional[bool], typer.Option(flags or f"--{flag}/--no-{flag}", help=help, show_default=False)]
    kind = f.metadata.get("cli") or {"int": int, "float": float, "list[str]": List[str]}.get(base, str)
    extra = {"metavar": "<str>"} if base == "list[str]" else {}  # repeatable: one value per flag, not a list
    return Annotated[Optional[kind], typer.Option(*([flags] if flags else []), help=help, **extra)]


def training_parameters(spec: MethodSpec, run_options: dict) -> list[inspect.Parameter]:
    """--images, --token, the run options, then every field of the method's sections (a name once,
    the first section's: DreamBooth's --train-text-encoder feeds [lora] too, as every flag does).
    `run_options`: {name: (annotation, default)} of the options every training command has."""
    options: dict = {}
    for s in spec.sections:
        for f in dataclasses.fields(SECTIONS[s]):
            if not f.metadata.get("recipe_only") and f"{s}.{f.name}" not in spec.hidden and f.name not in options:
                options[f.name] = (_option(s, f, spec.help.get(f"{s}.{f.name}")), None)
    first = {k: options.pop(k) for k in ("images", "token")}
    return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
            for name, (annotation, default) in {**first, **run_options, **options}.items()]
