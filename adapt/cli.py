"""The `adapt` command line: parse, build configs, call the library. Nothing else lives here.

Heavy libraries (torch, diffusers, ...) are imported inside the commands, after the arguments
and the recipe have been checked, so `adapt --help` and argument errors answer at once.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, List, Optional

import typer
import typer.core

from .config import field_help as H
from .errors import AdaptError

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


def _quiet_libraries() -> None:
    """Our progress bars and one-line logs only; libraries' info chatter is hidden."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("bitsandbytes", "accelerate", "peft", "diffusers", "transformers", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)


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
    from .signals import interrupt_on_sigterm

    interrupt_on_sigterm()  # SIGTERM stops a command as cleanly as Ctrl-C (partial files removed)
    rank = int(os.environ.get("RANK", "0") or 0)  # under `accelerate launch`, only process 0 talks
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s", stream=sys.stderr)
    _quiet_libraries()


# --- options shared by the training commands (help text comes from adapt/config.py) -------------
def _opt(section: str, name: str, kind):
    """An optional --name option whose help (and default, shown) come from the config field."""
    return Annotated[Optional[List[str] if kind is list else kind], typer.Option(help=H(section, name))]


def _switch(section: str, name: str):
    """A --name/--no-name switch; None when not given, so a recipe's value can stand."""
    flag = name.replace("_", "-")
    return Annotated[Optional[bool], typer.Option(f"--{flag}/--no-{flag}", help=H(section, name), show_default=False)]


Model = Annotated[Optional[str], typer.Option(help="Base model: a diffusers folder or a cached hub id. Default: the bundled emoji base model.")]
Output = Annotated[Optional[Path], typer.Option(help="Run folder. Default: outputs/<method>-<timestamp>.")]
Recipe = Annotated[Optional[Path], typer.Option(help="TOML recipe: [data] [lora] [dreambooth] [train] sections of option defaults; flags override it.")]
Overwrite = Annotated[bool, typer.Option(help="Replace a finished run already in --output.")]
Images = _opt("data", "images", Path)
Token = _opt("data", "token", str)
Prompt = _opt("data", "prompt", str)
ClassWord = _opt("data", "class_word", str)
Resolution = _opt("data", "resolution", int)
RandomFlip = _switch("data", "random_flip")
Steps = _opt("train", "steps", int)
BatchSize = _opt("train", "batch_size", int)
GradAccum = _opt("train", "grad_accum", int)
Lr = _opt("train", "lr", float)
LrScheduler = _opt("train", "lr_scheduler", str)
Warmup = _opt("train", "warmup_steps", int)
Optimizer = _opt("train", "optimizer", str)
MaxGradNorm = _opt("train", "max_grad_norm", float)
Precision = _opt("train", "mixed_precision", str)
GradCkpt = _switch("train", "gradient_checkpointing")
CacheLatents = _switch("train", "cache_latents")
CacheText = _switch("train", "cache_text")
Seed = _opt("train", "seed", int)
CaptionDropout = _opt("train", "caption_dropout", float)
CheckpointEvery = _opt("train", "checkpoint_every", int)
KeepCheckpoints = _opt("train", "keep_checkpoints", int)
Resume = _opt("train", "resume", str)
SkipBad = _switch("data", "skip_bad_images")
SkipNonfinite = _switch("train", "skip_nonfinite")
Buckets = _switch("data", "buckets")
BucketStep = _opt("data", "bucket_step", int)
Dataset = _opt("data", "dataset", str)
ImageColumn = _opt("data", "image_column", str)
CaptionColumn = _opt("data", "caption_column", str)
SnrGamma = _opt("train", "snr_gamma", float)
NoiseOffset = _opt("train", "noise_offset", float)
LogWith = _opt("train", "log_with", str)
ValidationPrompt = _opt("train", "validation_prompt", list)
ValidationEvery = _opt("train", "validation_every", int)
ValidationSteps = _opt("train", "validation_steps", int)
NumProcesses = _opt("train", "num_processes", int)
LoraFormat = Annotated[Optional[str], typer.Option("--format", help=H("lora", "format"))]


def _output_dir(output: Path | None, method: str, overwrite: bool) -> Path:
    from .formats import RECIPE_FILE

    out = output or Path("outputs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and not out.is_dir():
        raise AdaptError(f"--output {out} is a file; pass a folder for the run")
    if (out / RECIPE_FILE).exists() and not overwrite:
        raise AdaptError(f"{out} already holds a finished run; pass another --output or --overwrite to replace it")
    return out


# The recipe sections each method reads.
METHODS = {
    "lora": ("data", "lora", "train"),
    "dreambooth": ("data", "dreambooth", "lora", "train"),
    "textual-inversion": ("data", "textual_inversion", "train"),
}


def _method_defaults(cfgs: dict) -> dict:
    """A method's own defaults for [train], below the recipe and the flags."""
    db = cfgs.get("dreambooth")
    if db is not None and not db.lora:
        return {"lr": 5e-6}  # full UNet fine-tuning; LoRA keeps the LoRA default
    if "textual_inversion" in cfgs:
        return {"lr": 5e-3}  # the textual-inversion paper's
    return {}


def _make_method(name: str, cfgs: dict):
    if name == "textual-inversion":
        from .methods.textual_inversion import TextualInversionMethod

        ti = cfgs["textual_inversion"]
        formats = ("diffusers",) if ti.format == "diffusers" else ("diffusers", ti.format)
        return TextualInversionMethod(cfgs["data"].token, ti.init_token, ti.num_vectors, formats)
    if name == "dreambooth" and not cfgs["dreambooth"].lora:
        from .methods.full import FullMethod

        return FullMethod(train_text_encoder=cfgs["dreambooth"].train_text_encoder)
    from .methods.lora import LoraMethod

    return LoraMethod(cfgs["lora"])


def _class_examples(model, data, db, resolution: int):
    """Prior preservation as data: class images are examples of group 1 weighted by lambda."""
    from .classimages import ensure_class_images
    from .data import Example

    if not (db.class_prompt or data.class_word):
        raise AdaptError("prior preservation needs --class-word (e.g. 'cat') or --class-prompt; "
                         "or pass --no-prior-preservation")
    class_prompt = db.class_prompt or f"a photo of {data.class_word}"
    _, files = ensure_class_images(model, class_prompt, db.num_class_images, resolution, scheduler=db.class_scheduler,
                                   steps=db.class_steps, folder=db.class_images)
    return [Example(p, class_prompt, weight=db.prior_loss_weight, group=1) for p in files]


def _relaunch(num_processes: int) -> None:
    """Run this same command as N data-parallel processes: `accelerate launch --multi_gpu` on GPUs;
    on CPU torch's launcher with ACCELERATE_USE_CPU (accelerate's multi-CPU mode, gloo, no MPI)."""
    import socket
    import subprocess

    import torch

    argv, skip = [], False
    for a in sys.argv[1:]:
        if skip:
            skip = False
        elif a == "--num-processes":
            skip = True
        elif not a.startswith("--num-processes="):
            argv.append(a)
    env = dict(os.environ)
    if torch.cuda.is_available():
        launcher = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", str(num_processes),
                    "--num_machines", "1", "--dynamo_backend", "no", "--mixed_precision", "no"]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launcher = ["torch.distributed.run", "--nproc_per_node", str(num_processes), "--master_addr", "127.0.0.1",
                    "--master_port", str(port)]
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", *launcher, "-m", "adapt", *argv]
    log.info("relaunching with %d processes: %s", num_processes, " ".join(cmd))
    from .signals import wait_forwarding

    raise typer.Exit(wait_forwarding(subprocess.Popen(cmd, env=env)))  # SIGTERM reaches the workers: graceful stop


def _train(method_name: str, options: dict) -> None:
    """Shared body of the training commands: configs -> data -> components -> the one loop."""
    from .config import build, read_recipe

    from .models import model_defaults, resolve_model

    recipe = read_recipe(options["recipe"]) if options.get("recipe") else None
    flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in options.items()}
    cfgs = {s: build(s, recipe, flags) for s in METHODS[method_name] if s != "train"}
    model = options.get("model")
    suggested = {} if (cfgs.get("dreambooth") and cfgs["dreambooth"].lora) else \
        model_defaults(resolve_model(model)).get(method_name, {})
    cfgs["train"] = build("train", recipe, flags, {**_method_defaults(cfgs), **suggested})
    if suggested:
        log.info("the model suggests %s for %s (its adapt.json); flags and recipes override",
                 ", ".join(f"{k}={v}" for k, v in suggested.items()), method_name)
    data, train_cfg, db, ti = cfgs["data"], cfgs["train"], cfgs.get("dreambooth"), cfgs.get("textual_inversion")
    template = data.prompt
    if ti is not None:
        if not ti.init_token:
            raise AdaptError("textual inversion needs --init-token WORD: an existing word close to the concept, e.g. 'cat'")
        if ti.scale_lr:
            train_cfg.lr *= train_cfg.batch_size * train_cfg.grad_accum
        if flags.get("prompt") is None and "prompt" not in (recipe or {}).get("data", {}):
            from .methods.textual_inversion import TEMPLATES

            template = TEMPLATES[ti.property]
    if data.images is None and data.dataset is None:
        raise AdaptError("no training images; pass --images DIR (a folder of .png/.jpg files) or --dataset NAME_OR_PATH")
    if data.token is None:
        raise AdaptError("no token; pass --token '<sks>' (a rare word the concept is bound to)")
    if db is not None:
        from .schedulers import check_scheduler

        check_scheduler(db.class_scheduler)
    if train_cfg.resume and options.get("output") is None:
        raise AdaptError("--resume needs --output: the run folder whose checkpoints to continue")
    out = _output_dir(options.get("output"), method_name, options.get("overwrite", False))
    from .locks import run_folder

    with run_folder(out):  # one run per folder: a second one is refused here, before anything loads
        _run(method_name, cfgs, template, model, out)


def _run(method_name: str, cfgs: dict, template, model: str | None, out: Path) -> None:
    """The part of a training command that holds the run folder: data, class images, the loop."""
    from . import __version__
    from .models import resolve_model

    data, train_cfg, db = cfgs["data"], cfgs["train"], cfgs.get("dreambooth")
    if train_cfg.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        _relaunch(train_cfg.num_processes)
    train_cfg.num_processes = int(os.environ.get("WORLD_SIZE", train_cfg.num_processes))  # as launched (also by accelerate launch)

    from accelerate import PartialState

    from .data import check_images, dataset_examples, instance_examples
    from .models import native_resolution

    # Under a launcher, the first PartialState fixes the distributed setup for the process; on CPU
    # that needs cpu=True (accelerate's multi-CPU mode, which Accelerator reads from the same variable).
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"))
    with state.main_process_first():  # one process writes dataset images and class images; the others reuse them
        if data.dataset:
            examples = dataset_examples(data.dataset, data.image_column, data.caption_column, data.token, data.class_word,
                                        out / "dataset")
        else:
            examples = instance_examples(data.images, data.token, template, data.class_word)
        log.info("%d images from %s; e.g. prompt: %r", len(examples), data.dataset or data.images, examples[0].prompt)
        resolution = data.resolution or native_resolution(resolve_model(model))
        examples = check_images(examples, resolution, data.skip_bad_images)
        if db is not None and db.prior_preservation:
            examples += _class_examples(model, data, db, resolution)

    from .config import to_dict
    from .models import load_components
    from .train import train

    components = load_components(model)
    method = _make_method(method_name, cfgs)
    run_recipe = {"method": method_name, "base_model": str(model or "bundled"), "adapt_version": __version__,
                  **to_dict(*cfgs.values())}
    run_recipe["data"]["resolution"] = resolution
    log.info("training %s for %d steps at %d px -> %s", method_name, train_cfg.steps, resolution, out)
    result = train(components, method, examples, train_cfg, out, resolution=resolution, random_flip=data.random_flip,
                   bucket_step=data.bucket_step if data.buckets else None, recipe=run_recipe)
    losses, k = result["losses"], max(1, len(result["losses"]) // 10)
    log.info("done in %.0f s: loss %.4f -> %.4f (mean of the first and last 10%% of steps); wrote %s", result["seconds"],
             sum(losses[:k]) / k, sum(losses[-k:]) / k, out)


@app.command(help="""Train a LoRA on the UNet's attention (Q,K by default) for a concept in a folder of images.

\b
Example:
  adapt lora --images examples/cat --token "<sks>" --class-word "cat face" --steps 300
""")
@user_errors
def lora(images: Images = None, token: Token = None, model: Model = None, output: Output = None,
         recipe: Recipe = None, overwrite: Overwrite = False,
         prompt: Prompt = None, class_word: ClassWord = None, resolution: Resolution = None, random_flip: RandomFlip = None, skip_bad_images: SkipBad = None,
         buckets: Buckets = None, bucket_step: BucketStep = None, dataset: Dataset = None, image_column: ImageColumn = None,
         caption_column: CaptionColumn = None,
         rank: _opt("lora", "rank", int) = None,
         alpha: _opt("lora", "alpha", float) = None,
         targets: _opt("lora", "targets", str) = None,
         train_text_encoder: _switch("lora", "train_text_encoder") = None,
         format: LoraFormat = None,
         steps: Steps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None, lr: Lr = None,
         lr_scheduler: LrScheduler = None, warmup_steps: Warmup = None, optimizer: Optimizer = None,
         max_grad_norm: MaxGradNorm = None, mixed_precision: Precision = None, gradient_checkpointing: GradCkpt = None,
         cache_latents: CacheLatents = None, cache_text: CacheText = None, caption_dropout: CaptionDropout = None,
         seed: Seed = None, checkpoint_every: CheckpointEvery = None, keep_checkpoints: KeepCheckpoints = None,
         resume: Resume = None, skip_nonfinite: SkipNonfinite = None,
         snr_gamma: SnrGamma = None, noise_offset: NoiseOffset = None, log_with: LogWith = None,
         validation_prompt: ValidationPrompt = None, validation_every: ValidationEvery = None,
         validation_steps: ValidationSteps = None, num_processes: NumProcesses = None):
    _train("lora", dict(locals()))


@app.command(help="""DreamBooth: fine-tune the whole UNet (optionally the text encoder) on a few images of one
subject bound to a rare token, with prior preservation on generated class images.

\b
Loss = mean(instance) + lambda * mean(class); every batch holds --batch-size instance images and
as many class images. Class images are generated once with the base model and cached under
outputs/class-images/. The result is a full diffusers pipeline folder (--lora: a LoRA file).
\b
Memory savers (see recipes/dreambooth-*gb.toml): --gradient-checkpointing (~20-30% slower),
--optimizer adamw8bit (optimizer state 4x smaller), --mixed-precision fp16|bf16 (frozen weights
in half precision, trainable fp32), cached latents and text embeddings (default on), --lora.
\b
Example:
  adapt dreambooth --images examples/cat --token sks --class-word "cat face" \\
      --class-prompt "an emoji of cat face" --output outputs/cat-db
""")
@user_errors
def dreambooth(images: Images = None, token: Token = None, model: Model = None, output: Output = None,
               recipe: Recipe = None, overwrite: Overwrite = False,
               prompt: Prompt = None, class_word: ClassWord = None, resolution: Resolution = None, random_flip: RandomFlip = None, skip_bad_images: SkipBad = None,
         buckets: Buckets = None, bucket_step: BucketStep = None, dataset: Dataset = None, image_column: ImageColumn = None,
         caption_column: CaptionColumn = None,
               prior_preservation: _switch("dreambooth", "prior_preservation") = None,
               class_prompt: _opt("dreambooth", "class_prompt", str) = None,
               num_class_images: _opt("dreambooth", "num_class_images", int) = None,
               prior_loss_weight: _opt("dreambooth", "prior_loss_weight", float) = None,
               class_images: _opt("dreambooth", "class_images", Path) = None,
               class_scheduler: _opt("dreambooth", "class_scheduler", str) = None,
               class_steps: _opt("dreambooth", "class_steps", int) = None,
               train_text_encoder: _switch("dreambooth", "train_text_encoder") = None,
               lora: Annotated[Optional[bool], typer.Option("--lora/--full", help=H("dreambooth", "lora"), show_default=False)] = None,
               rank: Annotated[Optional[int], typer.Option(help=H("lora", "rank") + " (with --lora)")] = None,
               alpha: Annotated[Optional[float], typer.Option(help=H("lora", "alpha") + " (with --lora)")] = None,
               targets: Annotated[Optional[str], typer.Option(help=H("lora", "targets") + " (with --lora)")] = None,
               format: LoraFormat = None,
               steps: Steps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
               lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. [default: 5e-06 (full UNet), 0.0001 with --lora]")] = None,
               lr_scheduler: LrScheduler = None, warmup_steps: Warmup = None, optimizer: Optimizer = None,
               max_grad_norm: MaxGradNorm = None, mixed_precision: Precision = None, gradient_checkpointing: GradCkpt = None,
               cache_latents: CacheLatents = None, cache_text: CacheText = None, caption_dropout: CaptionDropout = None,
               seed: Seed = None, checkpoint_every: CheckpointEvery = None, keep_checkpoints: KeepCheckpoints = None,
               resume: Resume = None, skip_nonfinite: SkipNonfinite = None,
         snr_gamma: SnrGamma = None, noise_offset: NoiseOffset = None, log_with: LogWith = None,
         validation_prompt: ValidationPrompt = None, validation_every: ValidationEvery = None,
         validation_steps: ValidationSteps = None, num_processes: NumProcesses = None):
    _train("dreambooth", dict(locals()))


@app.command(name="textual-inversion", help="""Textual inversion: learn a new word's embedding under a frozen model.

\b
The token (and token_1..token_{N-1} with --num-vectors N) is added to the tokenizer and starts from
--init-token's embedding; only those rows train, everything else stays bit-identical. Images
without a caption file are trained under prompt templates (--property object|style). Saved as
learned_embeds.safetensors ({token: [N, dim]}, diffusers' load_textual_inversion format);
--format a1111 also writes the A1111/ComfyUI file <token>.safetensors (the prompt word there).
\b
Example:
  adapt textual-inversion --images examples/cat --token "<cat-toy>" --init-token cat --output outputs/cat-ti
  adapt generate "an emoji of <cat-toy>" --embedding outputs/cat-ti/learned_embeds.safetensors
""")
@user_errors
def textual_inversion(images: Images = None, token: Token = None, model: Model = None, output: Output = None,
                      recipe: Recipe = None, overwrite: Overwrite = False,
                      init_token: _opt("textual_inversion", "init_token", str) = None,
                      num_vectors: _opt("textual_inversion", "num_vectors", int) = None,
                      property: Annotated[Optional[str], typer.Option("--property", help=H("textual_inversion", "property"))] = None,
                      format: Annotated[Optional[str], typer.Option("--format", help=H("textual_inversion", "format"))] = None,
                      scale_lr: _switch("textual_inversion", "scale_lr") = None,
                      prompt: Annotated[Optional[str], typer.Option(help="One prompt template instead of the --property templates; {token} is filled in.")] = None,
                      resolution: Resolution = None, random_flip: RandomFlip = None, skip_bad_images: SkipBad = None,
         buckets: Buckets = None, bucket_step: BucketStep = None, dataset: Dataset = None, image_column: ImageColumn = None,
         caption_column: CaptionColumn = None,
                      steps: Steps = None, batch_size: BatchSize = None, grad_accum: GradAccum = None,
                      lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. [default: 0.005]")] = None,
                      lr_scheduler: LrScheduler = None, warmup_steps: Warmup = None, optimizer: Optimizer = None,
                      max_grad_norm: MaxGradNorm = None, mixed_precision: Precision = None, gradient_checkpointing: GradCkpt = None,
                      cache_latents: CacheLatents = None, caption_dropout: CaptionDropout = None,
                      seed: Seed = None, checkpoint_every: CheckpointEvery = None, keep_checkpoints: KeepCheckpoints = None,
                      resume: Resume = None, skip_nonfinite: SkipNonfinite = None,
         snr_gamma: SnrGamma = None, noise_offset: NoiseOffset = None, log_with: LogWith = None,
         validation_prompt: ValidationPrompt = None, validation_every: ValidationEvery = None,
         validation_steps: ValidationSteps = None, num_processes: NumProcesses = None):
    _train("textual-inversion", dict(locals()))


def _check_sampling(scheduler: str, steps: int, count: int, size: int | None) -> None:
    from .schedulers import check_scheduler

    check_scheduler(scheduler)
    if count < 1 or steps < 1:
        raise AdaptError("--num-images and --steps must be >= 1")
    if size is not None and (size < 8 or size % 8):
        raise AdaptError(f"--size {size} must be a positive multiple of 8")


def _loras(specs: list[str] | None) -> list[tuple[str, float]]:
    from .infer import parse_weighted

    loras = [parse_weighted(s) for s in (specs or [])]
    for path, _ in loras:
        if not Path(path).is_file():
            raise AdaptError(f"LoRA file {path} not found; pass FILE[:WEIGHT] with an existing .safetensors file")
    return loras


def _guidance(model: str | None, guidance: float | None) -> float:
    from .models import model_defaults, resolve_model

    if guidance is not None:
        return guidance
    return float(model_defaults(resolve_model(None if model in (None, "bundled") else model)).get("guidance", 7.5))


Lora = Annotated[Optional[List[str]], typer.Option(help="LoRA file with optional weight, FILE[:WEIGHT]; repeat for several.")]
Lenient = Annotated[bool, typer.Option(help="Leave out LoRA keys that fit no module (of the model, or of any SD/SDXL model) with a warning, instead of stopping.")]
AllowPickle = Annotated[bool, typer.Option(help="Also read pickle LoRA/embedding files (.pt/.bin/.ckpt), tensors only, with a warning. Only for files you trust.")]
Embedding = Annotated[Optional[List[str]], typer.Option(help="Textual-inversion embedding (diffusers or A1111 safetensors), FILE[:TOKEN] to rename; repeatable.")]


def _embeddings(specs: list[str] | None) -> list[tuple[str, str | None]]:
    from .infer import parse_embedding

    out = [parse_embedding(s) for s in (specs or [])]
    for path, _ in out:
        if not Path(path).is_file():
            raise AdaptError(f"embedding file {path} not found; pass FILE[:TOKEN] with an existing .safetensors file")
    return out
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
             scheduler: Scheduler = "dpm++2m-karras", steps: SampleSteps = 25, guidance: Guidance = None,
             negative_prompt: Annotated[Optional[str], typer.Option(help="What to steer away from.")] = None,
             seed: Annotated[int, typer.Option(help="Seed of the first image; image i uses seed+i.")] = 0,
             num_images: Annotated[int, typer.Option(help="How many images.")] = 1,
             size: Size = None,
             output: Annotated[Optional[Path], typer.Option(help="Folder for image-NNN.png, grid.png, generation.json. Default: outputs/generate-<timestamp>.")] = None):
    _check_sampling(scheduler, steps, num_images, size)
    loras, embeddings = _loras(lora), _embeddings(embedding)
    out = output or Path("outputs") / f"generate-{time.strftime('%Y%m%d-%H%M%S')}"

    from .infer import generate as render, load_pipeline, write_images

    pipe = load_pipeline(model, scheduler, loras=loras, embeddings=embeddings, fuse=fuse, allow_pickle=allow_pickle,
                         lenient=lenient)
    guidance = _guidance(model, guidance)
    seeds = [seed + i for i in range(num_images)]
    images = render(pipe, [prompt] * num_images, seeds, steps=steps, guidance=guidance,
                    negative_prompt=negative_prompt, size=size)
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "model": model or "bundled",
                "loras": [{"file": p, "weight": w} for p, w in loras],
                "embeddings": [{"file": p, "token": t} for p, t in embeddings], "scheduler": scheduler, "steps": steps,
                "guidance": guidance, "seeds": seeds, "size": size}
    write_images(images, out, settings)
    log.info("wrote %d image(s) and grid.png to %s", len(images), out)


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
             scheduler: Scheduler = "dpm++2m-karras", steps: SampleSteps = 25, guidance: Guidance = None,
             seed: Annotated[int, typer.Option(help="Seed of the first prompt; prompt i uses seed+i unless its line sets one.")] = 0,
             size: Size = None,
             batch_size: Annotated[int, typer.Option(help="Images rendered at once.")] = 8,
             allow_pickle: AllowPickle = False, lenient: Lenient = False,
             output: Annotated[Optional[Path], typer.Option(help="Folder for eval.json and grid.png. Default: outputs/eval-<timestamp>.")] = None):
    from .evaluate import format_table, read_prompts, run_eval

    if (prompts is None) == (not prompt):
        raise AdaptError("pass either --prompts FILE or --prompt TEXT (one or more)")
    _check_sampling(scheduler, steps, num_images, size)
    if batch_size < 1 or (limit is not None and limit < 1):
        raise AdaptError("--batch-size and --limit must be >= 1")
    if refs_b is not None and refs is None:
        raise AdaptError("--refs-b needs --refs (the first style's references)")
    for flag, folder in (("--refs", refs), ("--refs-b", refs_b), ("--set", set_), *(("--style-refs", d) for d in style_refs or ())):
        if folder is not None and not folder.is_dir():
            raise AdaptError(f"{flag} {folder} is not a folder; pass a folder of images")
    if prompts is not None:
        items = read_prompts(prompts, seed)[:limit]
    else:
        items = [{"caption": p, "seed": seed + k} for p in prompt for k in range(num_images)]
    loras, compare_loras, embeddings = _loras(lora), _loras(compare_lora), _embeddings(embedding)
    out = output or Path("outputs") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"

    from .infer import generate as render, load_pipeline

    guidance = _guidance(model, guidance)

    def renderer(model_name, lora_list, embedding_list=()):
        pipe = load_pipeline(None if model_name in (None, "bundled") else model_name, scheduler, loras=lora_list,
                             embeddings=embedding_list, allow_pickle=allow_pickle, lenient=lenient)
        return lambda ps, ss: render(pipe, ps, ss, steps=steps, guidance=guidance, size=size, batch_size=batch_size)

    compare = renderer(compare_model, compare_loras) if (compare_model or compare_loras) else None
    metrics = run_eval(renderer(model, loras, embeddings), items, out, refs_dir=refs, refs_b_dir=refs_b, compare=compare,
                       set_dir=set_, base_seed=seed, batch_size=batch_size, style_dirs=style_refs or ())
    typer.echo(format_table(metrics))
    log.info("wrote eval.json and grid.png to %s", out)


@app.command(help="""Combine LoRAs: into one LoRA file (exact weighted sum, or rank-R by SVD), or fused into a model folder.

\b
Examples:
  adapt merge --lora a.safetensors:0.7 --lora b.safetensors:0.4 --output ab.safetensors
  adapt merge --lora a.safetensors:0.7 --lora b.safetensors:0.4 --output ab8.safetensors --rank 8
  adapt merge --lora a.safetensors:0.8 --into-model outputs/model-with-a
""")
@user_errors
def merge(lora: Lora = None,
          output: Annotated[Optional[Path], typer.Option(help="Write ONE LoRA file: sum_i w_i * (alpha_i/r_i) * B_i A_i (ranks concatenated).")] = None,
          into_model: Annotated[Optional[Path], typer.Option(help="Write a diffusers model folder with the LoRAs fused into its weights.")] = None,
          model: Model = None,
          rank: Annotated[Optional[int], typer.Option(help="With --output: approximate the sum at this rank by SVD and print the relative error.")] = None,
          format: Annotated[str, typer.Option("--format", help="Layout of --output: diffusers or kohya.")] = "diffusers",
          overwrite: Overwrite = False, allow_pickle: AllowPickle = False, lenient: Lenient = False):
    loras = _loras(lora)
    if not loras:
        raise AdaptError("nothing to merge; pass --lora FILE[:WEIGHT] (repeatable)")
    if (output is None) == (into_model is None):
        raise AdaptError("pass exactly one of --output FILE (a LoRA file) or --into-model DIR (a model folder)")
    target = output or into_model
    if target.exists() and not overwrite:
        raise AdaptError(f"{target} already exists; pass another path or --overwrite to replace it")
    if output is not None:
        from .lora_names import is_sdxl
        from .loras import FORMATS, combine, read_lora, reduce_rank, write_lora

        if format not in FORMATS:
            raise AdaptError(f"unknown LoRA format {format!r}; choose one of: {', '.join(FORMATS)}")
        read = [(read_lora(p, allow_pickle, lenient), w) for p, w in loras]
        merged = combine([(modules, w) for (modules, _), w in read])
        if rank is not None:
            merged, err = reduce_rank(merged, rank)
            typer.echo(f"rank {rank}: relative error ||dW - dW_r|| / ||dW|| = {err:.6f}")
        meta = {"adapt.merge": json.dumps({"loras": [{"file": p, "weight": w} for p, w in loras], "rank": rank})}
        write_lora(output, merged, format, meta, sdxl=any(is_sdxl(modules, m) for (modules, m), _ in read))
        log.info("wrote %s (%s layout, rank %d)", output, format, next(iter(merged.values())).rank)
        return
    if rank is not None:
        raise AdaptError("--rank applies to --output (a LoRA file), not to --into-model")
    import torch

    from .formats import save_fused_pipeline
    from .infer import load_pipeline
    from .models import resolve_model

    pipe = load_pipeline(model, device="cpu", dtype=torch.float32, loras=loras, fuse=True, allow_pickle=allow_pickle,
                         lenient=lenient)
    save_fused_pipeline(pipe, resolve_model(model), into_model, {"method": "merge", "base_model": str(model or "bundled"),
                                                                 "loras": [{"file": p, "weight": w} for p, w in loras]})
    log.info("wrote model folder %s with %d LoRA(s) fused", into_model, len(loras))


@app.command(help="""Convert a LoRA file between the diffusers/peft and kohya/A1111/ComfyUI layouts.

\b
Kohya-layout SDXL files name UNet blocks as Stability does (input_blocks / middle_block /
output_blocks), as kohya's trainer writes them; the reader takes either block naming.

\b
Example:
  adapt convert outputs/cat-lora/pytorch_lora_weights.safetensors --to kohya --output cat.safetensors
""")
@user_errors
def convert(file: Annotated[Path, typer.Argument(help="The LoRA file to convert (either layout).")],
            to: Annotated[str, typer.Option(help="Target layout: kohya or diffusers.")],
            output: Annotated[Path, typer.Option(help="Where to write the converted file.")],
            overwrite: Overwrite = False, allow_pickle: AllowPickle = False, lenient: Lenient = False):
    from .loras import FORMATS, read_lora, write_lora

    if to not in FORMATS:
        raise AdaptError(f"unknown LoRA format {to!r}; choose one of: {', '.join(FORMATS)}")
    if not file.is_file():
        raise AdaptError(f"LoRA file {file} not found")
    if output.exists() and not overwrite:
        raise AdaptError(f"{output} already exists; pass another --output or --overwrite to replace it")
    loras, meta = read_lora(file, allow_pickle, lenient)
    keep = {k: v for k, v in meta.items() if k.startswith(("adapt.", "ss_")) and k not in ("ss_network_dim", "ss_network_alpha")}
    write_lora(output, loras, to, keep)
    log.info("wrote %s (%s layout, %d modules)", output, to, len(loras))


@app.command(help="List the sampler names `generate` accepts, with when to choose each.")
def schedulers():
    from .schedulers import SCHEDULERS

    width = max(map(len, SCHEDULERS))
    for name, spec in SCHEDULERS.items():
        typer.echo(f"{name:<{width}}  {'stochastic' if spec.stochastic else 'deterministic':<13}  {spec.note}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
