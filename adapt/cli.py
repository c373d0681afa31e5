"""The `adapt` command line: typer only. The training commands' options are generated from the
config fields of the sections their method reads (adapt.config, adapt.train_config, adapt.methods.METHODS); the LoRA
tools' commands are declared in adapt.lora_commands; the commands' bodies live in adapt.plan,
infer, evaluate, lora_tools and extract.

Heavy libraries (torch, diffusers, ...) are imported inside the commands, after the arguments
and the recipe have been checked, so `adapt --help` and argument errors answer at once.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer
import typer.core

from .checks import check_eval_args, check_output_folder, check_sampling, default_output, embedding_specs, lora_specs
from .errors import AdaptError
from .logs import defer_optional_imports, mark_own_process, quiet_libraries
from .methods import METHODS
from .lora_commands import LORA_COMMANDS
from .options import AllowPickle, Lenient, Lora, Model, Overwrite, Replace, training_parameters
from .plan import make_plan, run_plan
from .schedulers import DEFAULT_SCHEDULER, SCHEDULERS
from .signals import interrupt_on_sigterm

HELP = """Fine-tune Stable-Diffusion-style models on one GPU (or CPU) and generate with the result.

\b
Examples:
  adapt lora --images examples/cat --token "<sks>"            # LoRA on the bundled base model
  adapt generate "a photo of <sks>" --lora outputs/lora-.../pytorch_lora_weights.safetensors:0.8
  adapt eval --prompts adapt/base/training_set.jsonl --refs DIR  # score a model against references
  adapt schedulers                                             # the sampler names generate accepts
"""

class _Commands(typer.core.TyperGroup):
    """An unknown command names the valid ones."""

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except Exception as e:  # click's UsageError (typer vendors click, so match by attribute)
            if args and hasattr(e, "message"):
                e.message = f"unknown command '{args[0]}'; choose one of: {', '.join(self.list_commands(ctx))}"
            raise


app = typer.Typer(help=HELP, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None, cls=_Commands)
log = logging.getLogger("adapt")
_DEBUG = {"on": bool(os.environ.get("ADAPT_DEBUG"))}


def user_errors(fn):
    """AdaptError -> one line on stderr, exit code 2 (traceback only with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdaptError as e:
            if _DEBUG["on"]:
                raise
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(getattr(e, "exit_code", 2))  # 128 + signal for a run stopped by one
        except KeyboardInterrupt as e:
            typer.echo("interrupted; files already written are complete", err=True)
            raise typer.Exit(getattr(e, "exit_code", 130))

    return wrapper


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks for errors.")] = False):
    _DEBUG["on"] = _DEBUG["on"] or debug
    interrupt_on_sigterm()  # SIGTERM stops a command as cleanly as Ctrl-C (partial files removed)
    rank = int(os.environ.get("RANK", "0") or 0)  # under `accelerate launch`, only process 0 talks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stderr)
    quiet_libraries()
    defer_optional_imports()  # bitsandbytes loads only for --optimizer adamw8bit, not at every start (logs.DEFERRED)


Output = Annotated[Optional[Path], typer.Option(help="Run folder. Default: outputs/<method>-<timestamp>.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the resolved settings (and where each came from), the data, steps and epochs, "
                                           "and an estimate of peak memory and time per step; train nothing.")]


# --- the training commands: options generated from the config fields their method reads ---------
RUN_OPTIONS = {"model": (Model, None), "output": (Output, None), "recipe": None, "overwrite": (Overwrite, False),  # recipe: per method
               "dry_run": (DryRun, False)}


def _recipe_option(sections: tuple[str, ...]):
    names = " ".join(f"[{s}]" for s in ("data", *(s for s in sections if s not in ("data", "train")), "train"))
    return Annotated[Optional[Path], typer.Option(help=f"TOML recipe: {names} sections of option defaults; flags override it.")]


def _model_note(name: str) -> str:
    """What the bundled base's adapt.json suggests for command `name` (and its -lora variant), for its --help."""
    from .models import BUNDLED_MODEL, model_defaults

    found = model_defaults(BUNDLED_MODEL)
    said = [f"{'with --lora: ' if section.endswith('-lora') else ''}"
            + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in found[section].items())
            for section in (name, f"{name}-lora") if found.get(section)]
    return ("\n\nThe defaults below are adapt's. A model's adapt.json suggests its own, which a run takes instead "
            f"(flags and --recipe override both): the bundled base suggests {'; '.join(said)}. --dry-run shows each "
            "value and where it came from.") if said else ""


def _training_command(name: str, help: str) -> None:
    def command(**options):
        plan = make_plan(name, options)
        if options.get("dry_run"):
            from .dryrun import dry_run  # lazy: loads torch; the plan above is made without it

            typer.echo("\n".join(dry_run(plan)))
        else:
            run_plan(plan)

    command.__name__ = name.replace("-", "_")
    options = {k: (_recipe_option(METHODS[name].sections), None) if k == "recipe" else v for k, v in RUN_OPTIONS.items()}
    command.__signature__ = inspect.Signature(training_parameters(METHODS[name], options))
    app.command(name=name, help=help + _model_note(name))(user_errors(command))


for _name, _spec in METHODS.items():
    _training_command(_name, _spec.description)


Embedding = Annotated[Optional[List[str]], typer.Option(help="Textual-inversion embedding (diffusers or A1111 safetensors), FILE[:TOKEN] to rename; repeatable.")]


Scheduler = Annotated[str, typer.Option(help="Sampler name; `adapt schedulers` lists them.")]
SampleSteps = Annotated[int, typer.Option(help="Denoising steps.")]
Guidance = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 = off). Default: the model's adapt.json, else 7.5.", show_default=False)]
Size = Annotated[Optional[int], typer.Option(help="Image size in pixels. Default: the model's native size.")]


@app.command(help="""Generate images with a base model, LoRAs (each with its own weight) and a scheduler by name.

\b
Example:
  adapt generate "a photo of <sks>" --lora outputs/cat/pytorch_lora_weights.safetensors:0.8 \\
      --scheduler dpm++2m-karras --steps 25 --seed 0 --num-images 4
""")
@user_errors
def generate(prompt: Annotated[str, typer.Argument(help="What to draw.")],
             model: Model = None, lora: Lora = None, embedding: Embedding = None,
             fuse: Annotated[bool, typer.Option(help="Fuse the LoRAs into the weights before sampling (faster; same images within float tolerance).")] = False,
             allow_pickle: AllowPickle = False, lenient: Lenient = False,
             scheduler: Scheduler = DEFAULT_SCHEDULER, steps: SampleSteps = 25, guidance: Guidance = None,
             negative_prompt: Annotated[Optional[str], typer.Option(help="What to steer away from.")] = None,
             seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed+i.")] = 0,
             num_images: Annotated[int, typer.Option(help="How many images.")] = 1,
             size: Size = None,
             output: Annotated[Optional[Path], typer.Option(help="Folder for image-NNN.png, grid.png, generation.json. Default: outputs/generate-<timestamp>.")] = None,
             overwrite: Replace = False):
    check_sampling(scheduler, steps, num_images, size)
    loras, embeddings = lora_specs(lora), embedding_specs(embedding)
    out = output or default_output("generate")
    check_output_folder(out, "generation.json", overwrite)
    from .infer import generate_to_folder  # lazy: a command's body loads torch only after its arguments are checked

    generate_to_folder(prompt, out, model=model, loras=loras, embeddings=embeddings,
                       fuse=fuse, allow_pickle=allow_pickle, lenient=lenient, scheduler=scheduler, steps=steps,
                       guidance=guidance, negative_prompt=negative_prompt, seed=seed, num_images=num_images, size=size)


@app.command(name="eval", help="""Generate images for prompts with fixed seeds and score them against reference images.

\b
Metrics (feature space: RGB on white, box-shrunk to 16x16, L2; see adapt/metrics.py):
  fidelity  rank of each prompt's own reference among all references (top-1, top-5, chance)
  style     fraction of images closer to their reference in --refs than in --refs-b
  drift     mean distance between this model's and --compare-model's images (same prompts, seeds)
  set       mean distance to the nearest image of --set (did training move toward it?)
  styles    each image's nearest style among --style-refs folders; accuracy for prompts naming
            their "style"; distinct styles per prompt across seeds
  diversity mean distance between the seeds' images of one prompt (0 = the same picture)
Prompts come from --prompts FILE (JSONL: "caption", optional "file" naming the reference image,
"style" and "seed") or from --prompt TEXT (repeatable, --num-images seeds each).

\b
Examples:
  adapt eval --prompts adapt/base/training_set.jsonl --refs ../shared/data/emoji/noto --limit 100
  adapt eval --prompts adapt/base/heldout.jsonl --style-refs DATA/noto --style-refs DATA/openmoji \\
      --style-refs DATA/fluent-flat --style-refs DATA/fluent-modern --style-refs DATA/fluent-line
  adapt eval --prompt "an emoji of <sks> cat face" --num-images 8 --lora RUN/pytorch_lora_weights.safetensors \\
      --set examples/cat --compare-model bundled
""")
@user_errors
def evaluate(prompts: Annotated[Optional[Path], typer.Option(help="JSONL prompts file (caption, file, seed per line).")] = None,
             prompt: Annotated[Optional[List[str]], typer.Option(help="A prompt; repeat for several (instead of --prompts).")] = None,
             num_images: Annotated[int, typer.Option(help="Images (seeds) per --prompt.")] = 4,
             limit: Annotated[Optional[int], typer.Option(help="Use only the first N lines of --prompts.")] = None,
             refs: Annotated[Optional[Path], typer.Option(help="Folder of reference images named by the prompts' \"file\" (fidelity).")] = None,
             refs_b: Annotated[Optional[Path], typer.Option(help="Second style's references, same file names (style metric).")] = None,
             style_refs: Annotated[Optional[List[Path]], typer.Option(help="A style's reference folder (same file names); repeat for several: each image's nearest style, accuracy for prompts that name their \"style\", distinct styles per prompt.")] = None,
             set_: Annotated[Optional[Path], typer.Option("--set", help="Folder of images to measure the distance to.")] = None,
             model: Model = None, lora: Lora = None, embedding: Embedding = None,
             compare_model: Annotated[Optional[str], typer.Option(help="Second model for drift and comparison; 'bundled' = the bundled base.")] = None,
             compare_lora: Annotated[Optional[List[str]], typer.Option(help="LoRA(s) for the compare model, FILE[:WEIGHT].")] = None,
             scheduler: Scheduler = DEFAULT_SCHEDULER, steps: SampleSteps = 25, guidance: Guidance = None,
             seed: Annotated[int, typer.Option(help="Seed of the first prompt; prompt i uses seed+i unless its line sets one.")] = 0,
             size: Size = None,
             batch_size: Annotated[int, typer.Option(help="Images rendered at once.")] = 8,
             allow_pickle: AllowPickle = False, lenient: Lenient = False,
             output: Annotated[Optional[Path], typer.Option(help="Folder for eval.json and grid.png. Default: outputs/eval-<timestamp>.")] = None,
             overwrite: Replace = False):
    check_eval_args(prompts, prompt, batch_size, limit, {"--refs": refs, "--refs-b": refs_b, "--set": set_, "--style-refs": style_refs})
    check_sampling(scheduler, steps, num_images, size)
    out = output or default_output("eval")
    check_output_folder(out, "eval.json", overwrite)
    from .eval_io import format_table, read_prompts  # lazy: PIL and numpy (metrics), after the argument checks

    if prompts is not None:
        items = read_prompts(prompts, seed)[:limit]
    else:
        items = [{"caption": p, "seed": seed + k} for p in prompt for k in range(num_images)]
    loras, compare_loras, embeddings = lora_specs(lora), lora_specs(compare_lora), embedding_specs(embedding)
    from .evaluate import evaluate_models  # lazy: loads torch (a command's body)

    metrics = evaluate_models(items, out, model=model, loras=loras, embeddings=embeddings, compare_model=compare_model,
                              compare_loras=compare_loras, scheduler=scheduler, steps=steps, guidance=guidance, size=size,
                              batch_size=batch_size, allow_pickle=allow_pickle, lenient=lenient, refs_dir=refs,
                              refs_b_dir=refs_b, set_dir=set_, base_seed=seed, style_dirs=style_refs or ())
    typer.echo(format_table(metrics))
    log.info("wrote eval.json and grid.png to %s", out)


for _command, _help in LORA_COMMANDS:  # merge, convert, extract, resize (lora_commands.py)
    app.command(help=_help)(user_errors(_command))


@app.command(help="List the sampler names `generate` accepts, with when to choose each.")
def schedulers():
    width = max(map(len, SCHEDULERS))
    for name, spec in SCHEDULERS.items():
        typer.echo(f"{name:<{width}}  {'stochastic' if spec.stochastic else 'deterministic':<13}  {spec.note}")


def main() -> None:
    mark_own_process()  # one command per process: a training run may defer what it does not use (logs.py)
    app()


if __name__ == "__main__":
    main()
