"""Recipes: the layering of a run's settings, and the TOML file that records them.

The config dataclasses (config.py) declare each setting once; this module places them in their
sections, reads a recipe file (unknown sections and keys, or values of the wrong type, are errors),
and builds a section from its layers: field defaults < the method's defaults < the model's adapt.json
< a recipe < the flags. Nothing heavy is imported.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from .config import DataConfig, DreamBoothConfig, LoraConfig, TextualInversionConfig
from .errors import AdaptError
from .train_config import TrainConfig

SECTIONS: dict[str, type] = {"data": DataConfig, "lora": LoraConfig, "dreambooth": DreamBoothConfig,
                             "textual_inversion": TextualInversionConfig, "train": TrainConfig}


def field_help(section: str, name: str) -> str:
    """Help text for a CLI option, taken from the config field so it is written once."""
    f = {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]
    default = f.default
    if isinstance(default, (list, tuple)):
        default = ",".join(default)
    return f"{f.metadata['help']} [default: {default}]" if default not in (None, "") else f.metadata["help"]


def _check_type(section: str, f: dataclasses.Field, value: Any) -> Any:
    kind = str(f.type)
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, (list, str)),
    }
    base = kind.split("|")[0].strip().split("[")[0]
    if value is None and "None" in kind:
        return value
    if not ok.get(base, True):
        raise AdaptError(f"recipe key [{section}] {f.name} = {value!r} should be of type {base}")
    return float(value) if base == "float" else value


def read_recipe(path: str | Path) -> dict[str, dict[str, Any]]:
    """Parse a recipe TOML into {section: {key: value}}, rejecting unknown sections and keys."""
    path = Path(path)
    if not path.is_file():
        raise AdaptError(f"recipe {path} not found; pass an existing .toml file (see recipes/)")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise AdaptError(f"recipe {path} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for section, values in raw.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise AdaptError(f"recipe {path}: unknown section [{section}]; valid: {', '.join(f'[{s}]' for s in SECTIONS)}")
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        for key, value in values.items():
            if key not in fields:
                raise AdaptError(f"recipe {path}: unknown key '{key}' in [{section}]; valid: {', '.join(fields)}")
            out.setdefault(section, {})[key] = _check_type(section, fields[key], value)
    return out


def build(section: str, recipe: dict[str, dict[str, Any]] | None, overrides: dict[str, Any],
          layers: dict[str, dict[str, Any]] | None = None, sources: dict[str, str] | None = None):
    """The section's config from its layers, later ones winning: the field defaults < `layers` in
    order (e.g. {"method": the method's defaults, "model": the model's adapt.json}) < the recipe <
    the command-line flags (None = 'not given'). `sources`, if given, is filled with where each
    field's value came from: "default", a layer's name, "recipe" or "flag"."""
    cls = SECTIONS[section]
    names = [f.name for f in dataclasses.fields(cls)]
    values: dict[str, Any] = {}
    origin = dict.fromkeys(names, "default")
    given = [*(layers or {}).items(), ("recipe", (recipe or {}).get(section, {})),
             ("flag", {k: v for k, v in overrides.items() if v is not None})]
    for source, layer in given:
        for k, v in layer.items():
            if k in origin:
                values[k], origin[k] = v, source
    if sources is not None:
        sources.update(origin)
    return cls(**values)


def to_dict(*configs) -> dict[str, dict[str, Any]]:
    """The recipe that reproduces a run: every section with every value, JSON/TOML-ready."""
    inv = {cls: name for name, cls in SECTIONS.items()}
    return {inv[type(c)]: dataclasses.asdict(c) for c in configs}


SOURCE_NAMES = {"default": "default", "method": "method default", "model": "model (adapt.json)", "recipe": "recipe",
                "flag": "flag", "prodigy": "--optimizer prodigy (1: a multiplier of its own step size)"}


def describe(configs: dict, sources: dict[str, dict[str, str]], everything: bool = True) -> list[str]:
    """The resolved settings of `configs` ({section: config}), a line each, with where each value came
    from (`sources`, as `build` filled it). `everything=False` keeps those not at adapt's defaults."""
    lines = []
    for section, config in configs.items():
        for f in dataclasses.fields(config):
            source = sources.get(section, {}).get(f.name, "default")
            if everything or source != "default":
                lines.append(f"  [{section}] {f.name} = {getattr(config, f.name)!r}  <- {SOURCE_NAMES[source]}")
    return lines
