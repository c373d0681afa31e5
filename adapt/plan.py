"""What a training command will do, decided before anything heavy loads: flags + recipe + the
model's adapt.json + the method's own defaults -> a Plan (configs, method, prompt template(s),
run folder). Mistakes in any of them are one-line errors here, before torch is imported.

Precedence, later winning: config defaults < the method's [train] defaults < the model's adapt.json
(any section's options, by name) < the recipe < the flags. `run_plan` takes the run folder and hands
over to adapt.launch (data, class images, the loop), imported there and then.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checks import default_output, list_images
from .errors import AdaptError
from .fileio import CHECKPOINTS_DIR, RECIPE_FILE, has_checkpoints
from .locks import run_folder
from .logs import RUN_DEFERRABLE, defer_for_this_run
from .methods import METHODS, MethodSpec
from .models import model_defaults, resolve_model
from .recipe import build, read_recipe
from .schedulers import DEFAULT_SCHEDULER, check_scheduler

log = logging.getLogger("adapt")


@dataclass
class Plan:
    command: str                   # the training command (a METHODS name), as recorded in the run's recipe
    spec: MethodSpec               # the method that runs (DreamBooth --lora: the LoRA method)
    configs: dict[str, Any]        # {section: config} of every section the method reads
    template: str | list[str]      # prompt template(s) for images without a caption file
    model: str | None              # as given (None: the bundled model)
    output: Path
    sources: dict[str, dict[str, str]]  # {section: {field: "default" | "method" | "model" | "recipe" | "flag"}}
    inputs: frozenset[str] = frozenset()  # entries of output holding what the run reads (--images OUTPUT/images)
    replace: bool = False                  # --overwrite of a run in output: its files move aside (locks.replacing)


def make_plan(command: str, options: dict[str, Any]) -> Plan:
    """`options`: the command's flags by parameter name (None = not given), with model, output,
    recipe and overwrite."""
    spec = METHODS[command]
    recipe = read_recipe(options["recipe"]) if options.get("recipe") else None
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    sources: dict[str, dict[str, str]] = {s: {} for s in (*spec.sections, "train")}
    configs = {s: build(s, recipe, flags, sources=sources[s]) for s in spec.sections if s != "train"}
    spec = spec.resolve(configs)
    model = options.get("model")
    section = spec.model_section or command  # DreamBooth --lora: "dreambooth-lora", a LoRA wants other rates
    suggested = _model_suggestions(model, section)
    if suggested:  # any section's option (the bundled base's DreamBooth prior-loss weight), below recipe and flags
        configs = {s: build(s, recipe, flags, {"model": suggested}, sources=sources[s]) for s in configs}
    train = build("train", recipe, flags, {"method": spec.train_defaults, "model": suggested}, sources=sources["train"])
    if suggested:
        log.info("the model suggests %s for %s (its adapt.json); flags and recipes override",
                 ", ".join(f"{k}={v}" for k, v in suggested.items()), section)
    configs["train"] = _optimizer_lr(train, recipe, flags, sources["train"])
    prompt_given = flags.get("prompt") is not None or "prompt" in (recipe or {}).get("data", {})
    template = spec.load().settle(configs, prompt_given)
    data, train_cfg = configs["data"], configs["train"]
    if data.images is None and data.dataset is None:
        raise AdaptError("no training images; pass --images DIR (a folder of .png/.jpg files) or --dataset NAME_OR_PATH")
    if data.token is None:
        raise AdaptError("no token; pass --token '<sks>' (a rare word the concept is bound to)")
    if data.images is not None:
        list_images(data.images)  # a missing or empty folder: said now, not after torch has loaded
    if train_cfg.validation_images:
        list_images(train_cfg.validation_images, "--validation-images")
    for config in configs.values():
        if hasattr(config, "check"):  # checks that belong to a run, not to every build (DreamBooth's scheduler)
            config.check()
    if train_cfg.resume and options.get("output") is None:
        raise AdaptError("--resume needs --output: the run folder whose checkpoints to continue")
    overwrite, resume = bool(options.get("overwrite")), bool(train_cfg.resume)
    output = _output_dir(options.get("output"), command, overwrite, resume)
    if train_cfg.resume == "latest" and not has_checkpoints(output):
        raise AdaptError(f"--resume latest: no checkpoint in {output / CHECKPOINTS_DIR}; start without --resume, or pass "
                         "--resume DIR")
    inputs = _inputs_inside(output, [options.get("recipe"), model, train_cfg.resume, train_cfg.cache_dir,
                                     train_cfg.validation_images, data.images, data.dataset,
                                     getattr(configs.get("dreambooth"), "class_images", None)])
    replace = overwrite and not resume and ((output / RECIPE_FILE).exists() or has_checkpoints(output))  # resume: keep
    return Plan(command, spec, configs, data.prompt if template is None else template, model, output, sources, inputs,
                replace)


def _optimizer_lr(train, recipe: dict | None, flags: dict, sources: dict[str, str]):
    """Prodigy's --lr multiplies the step size it estimates (1 is what it is made for): the methods' and
    models' AdamW learning rates do not apply to it, so it takes 1 unless a flag or the recipe set --lr."""
    if train.optimizer != "prodigy" or flags.get("lr") is not None or "lr" in (recipe or {}).get("train", {}):
        return train
    log.info("--optimizer prodigy: --lr 1 (a multiplier of the step size Prodigy estimates; the method's and "
             "model's AdamW learning rates do not apply)")
    sources["lr"] = "prodigy"
    return dataclasses.replace(train, lr=1.0)


def _model_suggestions(model: str | None, command: str) -> dict:
    return model_defaults(resolve_model(model)).get(command, {})


def _output_dir(output: Path | None, command: str, overwrite: bool, resume: bool) -> Path:
    out = output or default_output(command)
    if out.exists() and not out.is_dir():
        raise AdaptError(f"--output {out} is a file; pass a folder for the run")
    if (out / RECIPE_FILE).exists() and not overwrite:
        if resume and has_checkpoints(out):
            raise AdaptError(f"{out} holds a finished run; to train it on from its last checkpoint pass --overwrite too "
                             "(its files are replaced when it ends), or pass another --output")
        raise AdaptError(f"{out} already holds a finished run; pass another --output or --overwrite to replace it")
    if has_checkpoints(out) and not (overwrite or resume):
        raise AdaptError(f"{out} holds the checkpoints of an unfinished run; pass --resume latest to continue it, "
                         "--overwrite to start again there, or another --output")
    return out


def _inputs_inside(out: Path, paths: list) -> frozenset[str]:
    """The entries of `out` that hold one of `paths` (the run's path settings: images, class images, recipe, model,
    cache, ...; a symlink counts by its own path and by what it points to): --overwrite never touches them. `out`
    itself as an input is refused (the run's files would join the images)."""
    found = set()
    for root in {Path(os.path.abspath(out)), out.resolve()}:
        for value in filter(None, paths):
            for path in _exists({Path(os.path.abspath(value)), Path(value).resolve()}):
                if path == root:
                    raise AdaptError(f"--output {out} is also an input of this run; pass another --output")
                if path.is_relative_to(root):
                    found.add(path.relative_to(root).parts[0])
    return frozenset(found)


def _exists(paths: set[Path]) -> list[Path]:
    out = []
    for path in paths:
        try:
            if path.exists():
                out.append(path)
        except OSError:  # a name the filesystem cannot hold (too long): not a path of this run
            pass
    return out


def unused_packages(plan: Plan) -> list[str]:
    """The RUN_DEFERRABLE packages this run does not use: scipy unless a sampler it renders with
    (validation: the default; class images: --class-scheduler) needs it."""
    samplers = {DEFAULT_SCHEDULER}  # report.render_validation
    db = plan.configs.get("dreambooth")
    if db is not None and db.prior_preservation:
        samplers.add(db.class_scheduler)
    needed = {m for name in samplers for m in check_scheduler(name).requires}
    return [m for m in RUN_DEFERRABLE if m not in needed]


def run_plan(plan: Plan) -> None:
    """Hold the run folder (a second run there is refused before anything loads), then train."""
    defer_for_this_run(unused_packages(plan))  # before the stack loads: it decides then what is installed
    from .launch import run  # lazy: launch loads torch; everything above runs before it

    with run_folder(plan.output, plan.inputs, plan.replace):
        run(plan)

