"""THE inference module: a base pipeline + scheduler by name + LoRAs with a weight each.

Everything that renders images goes through `generate`: `adapt generate`, `adapt eval` and class
images on a pipeline from `load_pipeline`, validation samples on the training modules assembled by
`models.assemble_pipeline`; so an image made one way equals an image made another.
Each image has its own seeded generator: the same seed gives the same image at any batch size.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from .embeddings import BUNDLE_PREFIX, lora_embeddings, read_embedding
from .errors import AdaptError
from .fileio import read_safetensors, write_json
from .images import make_grid, save_image
from .lora_names import module_key
from .loras import is_kohya, parse_lora, report_unplaced, write_lora
from .lycoris import kind
from .logs import quiet_libraries
from .models import assemble_pipeline, is_sdxl_folder, model_defaults, resolve_model
from .schedulers import DEFAULT_SCHEDULER, make_scheduler
from .untrusted import check_finite

log = logging.getLogger("adapt")



def load_pipeline(model: str | None = None, scheduler: str = DEFAULT_SCHEDULER, device: str | None = None,
                  dtype=None, loras: list[tuple[str, float]] = (), embeddings: list[tuple[str, str | None]] = (),
                  fuse: bool = False, allow_pickle: bool = False, lenient: bool = False):
    """A diffusers StableDiffusionPipeline for `model` with the named scheduler, the LoRAs applied
    (`lenient`: see set_loras) and the textual-inversion embeddings loaded. `fuse` folds the LoRAs
    into the weights (faster sampling, same images within float tolerance) and removes the adapter
    layers."""
    quiet_libraries(loaded=True)
    path = resolve_model(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    try:
        pipe = assemble_pipeline(is_sdxl_folder(path), folder=path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise AdaptError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
    if dtype == torch.float16:
        pipe.vae.to(torch.float32)  # fp16 VAEs overflow (black images / NaN, SDXL's known failure); decoding is cheap
    decode_in_own_dtype(pipe.vae)
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    adapters = set_loras(pipe, loras, allow_pickle, lenient)
    if fuse and adapters:  # DoRA / LoHa / LoKr files are in the weights already
        pipe.fuse_lora(adapter_names=adapters)
        pipe.unload_lora_weights()
    for path, token in embeddings:
        load_embedding(pipe, path, token, allow_pickle)
    return pipe


def decode_in_own_dtype(vae) -> None:
    """The VAE decodes in its own weights' dtype, whatever dtype the latents come in and whatever
    autocast is on: an fp16 pipeline keeps its VAE fp32 (above) but hands it the UNet's fp16
    latents, and validation renders run under the training's autocast (fp16 there would overflow
    in the decoder too). Hooks on the modules `AutoencoderKL._decode` calls cast their input and
    turn autocast off inside them. Installed once per VAE."""
    if getattr(vae, "_adapt_own_dtype", False):
        return
    vae._adapt_own_dtype = True
    for module in (getattr(vae, "post_quant_conv", None), vae.decoder):
        if module is not None:
            module.register_forward_pre_hook(_autocast_off_and_cast)
            module.register_forward_hook(_autocast_back, always_call=True)  # also when the decode raises


def _autocast_off_and_cast(module, args):
    module._adapt_autocast = torch.autocast(args[0].device.type, enabled=False)
    module._adapt_autocast.__enter__()
    dtype = next(module.parameters()).dtype
    return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _autocast_back(module, args, output):
    module._adapt_autocast.__exit__(None, None, None)


def load_embedding(pipe, path: str, token: str | None = None, allow_pickle: bool = False) -> str:
    """Load a diffusers or A1111/ComfyUI embedding under `token`; returns the token."""
    return add_embedding(pipe, *read_embedding(path, token, allow_pickle), path)


def add_embedding(pipe, token: str, emb, path: str) -> str:
    """Add the embedding `emb` ([N, dim], or SDXL's {encoder: [N, dim]}) from `path` as the word `token`."""
    per_encoder = emb if isinstance(emb, dict) else {"text_encoder": emb}
    check_finite(per_encoder, path, "embedding")
    if set(per_encoder) != {"text_encoder", *(["text_encoder_2"] if getattr(pipe, "text_encoder_2", None) else [])}:
        raise AdaptError(f"embedding {path} is for {'SDXL (clip_l + clip_g)' if 'text_encoder_2' in per_encoder else 'one text encoder (SD 1.x/2.x)'}, "
                         "not for this model; was it made for another architecture?")
    try:
        for name, tensor in per_encoder.items():
            encoder, tokenizer = getattr(pipe, name), getattr(pipe, name.replace("text_encoder", "tokenizer"))
            pipe.load_textual_inversion(tensor.to(encoder.dtype), token=token, tokenizer=tokenizer, text_encoder=encoder)
    except ValueError as e:
        raise AdaptError(f"embedding {path} cannot be loaded as {token!r} ({str(e).splitlines()[0][:160]}); "
                         "was it made for another model, or is the token taken? rename it with FILE:TOKEN") from None
    first = per_encoder["text_encoder"]
    log.info("loaded embedding %s as %r (%d vector(s))", path, token, first.shape[0] if first.ndim == 2 else 1)
    return token


def set_loras(pipe, loras: list[tuple[str, float]], allow_pickle: bool = False, lenient: bool = False) -> list[str]:
    """Apply LoRAs, each with its own weight: W + sum_i w_i * dW_i; returns the diffusers adapters' names.

    Plain LoRA files (dW_i = (alpha_i / r_i) * B_i A_i) load as diffusers adapters. DoRA, LoHa and
    LoKr files are added into the weights (add_into_weights), their weight scaling each module's
    whole change as ComfyUI's strength does (diffusers' weight scales only a DoRA's B A, inside
    its normalisation, so there weight 0 is not the base). Weight 0 adds nothing, so it reproduces
    the base model bit for bit. A module the model lacks is an error naming the file (with
    `lenient`, a warning and the module is left out). Kohya files, pickles (only with
    allow_pickle, tensors only) and files with modules left out are handed to diffusers as our own
    diffusers-layout copy; errors always name the user's file. A pivotal-tuning LoRA's token embedding
    (bundled in a kohya file, or beside a diffusers file: embeddings.lora_embeddings) is loaded as it
    is; the weight applies to the LoRA.
    """
    if not loras:
        return []
    # A canonical order: adapters are summed one after the other, and float addition is not
    # associative, so this is what makes the order of --lora flags not matter, bit for bit.
    loras = sorted(loras, key=lambda lw: (str(Path(lw[0]).resolve()), lw[1]))
    modules = model_modules(pipe)
    adapters, into_weights, brought = [], [], []
    for path, weight in loras:
        everything, meta = read_safetensors(path, "LoRA", allow_pickle)  # clear error for missing / non-safetensors
        brought += lora_embeddings(path, everything, meta, allow_pickle)
        tensors = {k: v for k, v in everything.items() if not k.startswith(BUNDLE_PREFIX)}
        parsed = parse_lora(tensors, meta, path, lenient)
        fitting = {k: v for k, v in parsed.items() if k in modules}
        report_unplaced(path, [k for k in parsed if k not in fitting], len(parsed), lenient, "this model", "modules")
        if not fitting:
            raise AdaptError(f"LoRA {path} has no module of this model; was it trained on another base model?")
        if any(kind(lo) != "lora" for lo in fitting.values()):
            into_weights.append((path, fitting, weight))
        else:  # diffusers' kohya reader cannot place text-encoder LoRAs without out_proj (e.g. our q/k-only ones)
            own_copy = bool(meta.get("adapt.pickle") or is_kohya(tensors) or lenient or len(tensors) < len(everything))
            adapters.append((path, fitting if own_copy else None, weight))
    add_into_weights(pipe, into_weights)
    names = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, fitting, weight) in enumerate(adapters):
            source = path if fitting is None else write_lora(Path(tmp) / f"{i}.safetensors", fitting)
            try:
                pipe.load_lora_weights(str(source), adapter_name=f"lora_{i}")
            except (ValueError, RuntimeError, KeyError, TypeError) as e:
                raise AdaptError(f"LoRA {path} does not fit this model ({str(e).splitlines()[0][:200]}); "
                                 "was it trained on another base model?") from None
            names.append(f"lora_{i}")
    if names:
        pipe.set_adapters(names, adapter_weights=[w for _, _, w in adapters])
    for token, emb, source in brought:
        add_embedding(pipe, token, emb, source)
    return names


def add_into_weights(pipe, files: list[tuple[str, dict, float]]) -> None:
    """W <- W + sum_i w_i * dW_i(W) for the (path, modules, weight) of DoRA / LoHa / LoKr files,
    each change taken against the model's own weight W (so the files' order does not matter)."""
    modules = {module_key(c, n): m for c in ("unet", "text_encoder", "text_encoder_2")
               for n, m in (getattr(pipe, c).named_modules() if getattr(pipe, c, None) is not None else ()) if n}
    with torch.no_grad():
        for key in sorted({k for _, adapters, w in files if w for k in adapters}):
            weight = modules[key].weight
            base = weight.detach().float()
            total = base.clone()
            for path, adapters, w in files:
                if w and key in adapters:
                    try:
                        total += w * adapters[key].weight_delta(base)
                    except ValueError as e:
                        raise AdaptError(f"LoRA {path} does not fit this model (module {key}: {e}); "
                                         "was it trained on another base model?") from None
            weight.copy_(total.to(weight.dtype))


def model_modules(pipe) -> set[str]:
    """Module keys (lora_names.module_key) of the pipeline's UNet and text encoder(s)."""
    out = set()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None:
            out.update(module_key(component, n) for n, _ in module.named_modules() if n)
    return out


def generate(pipe, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 7.5,
             negative_prompt: str | None = None, size: int | None = None, batch_size: int = 8):
    """Render one image per (prompt, seed); returns PIL images."""
    if len(prompts) != len(seeds):
        raise ValueError("one seed per prompt")
    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start:start + batch_size]]
        out = pipe(prompt=chunk, negative_prompt=[negative_prompt] * len(chunk) if negative_prompt else None,
                   num_inference_steps=steps, guidance_scale=guidance, height=size, width=size,
                   generator=generators)
        images.extend(out.images)
    return images


def write_images(images, out_dir: str | Path, settings: dict) -> list[Path]:
    """image-000.png ... plus grid.png and generation.json (the settings that made them); an earlier generate's other
    image-*.png there go (a user's own files are not touched)."""
    out_dir = Path(out_dir)
    earlier = (out_dir / "generation.json").exists()  # --overwrite of an earlier generate: its images are ours to drop
    paths = [save_image(img, out_dir / f"image-{i:03d}.png") for i, img in enumerate(images)]
    for stale in set(out_dir.glob("image-*.png")) - set(paths) if earlier else ():
        stale.unlink()
    save_image(make_grid(images), out_dir / "grid.png")
    write_json(out_dir / "generation.json", settings)
    return paths


def default_guidance(model: str | None) -> float:
    """The guidance scale the model's adapt.json suggests, else 7.5."""
    return float(model_defaults(resolve_model(model)).get("guidance", 7.5))


def generate_to_folder(prompt: str, out: Path, *, model: str | None = None, loras=(), embeddings=(), fuse: bool = False,
                       allow_pickle: bool = False, lenient: bool = False, scheduler: str = DEFAULT_SCHEDULER,
                       steps: int = 25, guidance: float | None = None, negative_prompt: str | None = None, seed: int = 0,
                       num_images: int = 1, size: int | None = None) -> list[Path]:
    """The body of `adapt generate`: image i with seed+i, grid.png and generation.json in `out`."""
    pipe = load_pipeline(model, scheduler, loras=loras, embeddings=embeddings, fuse=fuse, allow_pickle=allow_pickle,
                         lenient=lenient)
    guidance = default_guidance(model) if guidance is None else guidance
    seeds = [seed + i for i in range(num_images)]
    images = generate(pipe, [prompt] * num_images, seeds, steps=steps, guidance=guidance,
                      negative_prompt=negative_prompt, size=size)
    settings = {"prompt": prompt, "negative_prompt": negative_prompt, "model": model or "bundled",
                "loras": [{"file": p, "weight": w} for p, w in loras],
                "embeddings": [{"file": p, "token": t} for p, t in embeddings], "scheduler": scheduler, "steps": steps,
                "guidance": guidance, "seeds": seeds, "size": size}
    paths = write_images(images, out, settings)
    log.info("wrote %d image(s) and grid.png to %s", len(images), out)
    return paths
