"""Base-model resolution and loading (diffusers StableDiffusionPipeline layout), plus tiny models.

`resolve_model` turns what the user typed (nothing, a folder, a cached hub id) into a folder, or a
one-line error saying what to pass instead; `model_defaults` reads the settings a model folder
recommends (its adapt.json). `load_components` returns the parts the training loop needs (VAE,
UNet, tokenizer(s) and text encoder(s), noise scheduler), frozen and in eval mode;
`assemble_pipeline` is the one place a pipeline is built from parts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import AdaptError
from .logs import quiet_libraries
from .untrusted import check_model_folder_files

log = logging.getLogger("adapt")

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODEL = PACKAGE_DIR / "base"
TOKENIZER_DIR = PACKAGE_DIR / "data_files" / "clip-tokenizer"
REQUIRED = ("tokenizer", "text_encoder", "vae", "unet", "scheduler")
REQUIRED_SDXL = REQUIRED + ("tokenizer_2", "text_encoder_2")


BUNDLED = "bundled"  # --model bundled names the bundled base explicitly (as --compare-model does)
_SAID: set = set()  # the bundled-model line is said once per process
DEFAULTS_FILE = "adapt.json"


def model_defaults(path: Path) -> dict:
    """Settings a model folder recommends (`adapt.json`): {"guidance": float, "<method>": {train
    option: value}}. They sit above adapt's own defaults and below recipes and flags; a tiny model
    needs other learning rates and guidance than SD 1.5, and says so here."""
    file = Path(path) / DEFAULTS_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise AdaptError(f"{file} is not valid JSON ({e}); fix or remove it") from None


def resolve_model(model: str | None) -> Path:
    """A diffusers pipeline folder for `model`: the bundled base when None or "bundled", a local
    folder, or a hub id that is already in the local Hugging Face cache (nothing is downloaded)."""
    if model in (None, BUNDLED) and not Path(BUNDLED).exists():
        if not (BUNDLED_MODEL / "model_index.json").is_file():
            raise AdaptError(f"no --model given and the bundled base model is missing at {BUNDLED_MODEL}; "
                             "pass --model PATH to a diffusers Stable Diffusion folder")
        if not _SAID:
            log.info("using the bundled emoji base model (%s); pass --model to use another", BUNDLED_MODEL)
            _SAID.add(BUNDLED_MODEL)
        return BUNDLED_MODEL
    path = Path(model).expanduser()
    if path.exists():
        return check_model_folder(path)
    if model.count("/") == 1 and not model.startswith((".", "/", "~")):
        # lazy: LIGHT module (plan resolves the model before argument errors)
        from huggingface_hub import snapshot_download
        try:
            folder = snapshot_download(model, local_files_only=True)
        except Exception:
            raise AdaptError(f"model '{model}' is neither a folder nor a hub id in the local cache (offline); "
                             "pass --model PATH to a diffusers Stable Diffusion folder") from None
        return check_model_folder(Path(folder))
    raise AdaptError(f"model folder {model} does not exist; pass --model PATH to a diffusers Stable Diffusion folder")


def check_model_folder(path: Path) -> Path:
    if not path.is_dir():
        raise AdaptError(f"--model {path} is a file; pass the diffusers pipeline folder that holds model_index.json")
    if not (path / "model_index.json").is_file():
        raise AdaptError(f"{path} has no model_index.json; pass a diffusers Stable Diffusion pipeline folder "
                         "(save_pretrained layout), not a single checkpoint file")
    missing = [c for c in (REQUIRED_SDXL if is_sdxl_folder(path) else REQUIRED) if not (path / c).is_dir()]
    if missing:
        raise AdaptError(f"model folder {path} lacks the component(s) {', '.join(missing)}; "
                         "pass a complete diffusers Stable Diffusion pipeline folder")
    check_model_folder_files(path)  # no code shipped with the model runs; broken weights headers are named
    return path


@dataclass
class Components:
    """What the loop and the methods work on. A field becomes None once released (see encode.py)."""

    tokenizer: Any
    text_encoder: Any
    vae: Any
    unet: Any
    noise_scheduler: Any
    source: Path  # the pipeline folder these came from (used to copy released parts on save)
    tokenizer_2: Any = None  # SDXL's second tokenizer / text encoder (OpenCLIP bigG); None for SD 1.x/2.x
    text_encoder_2: Any = None

    @property
    def resolution(self) -> int:
        return native_resolution(self.source)

    @property
    def is_sdxl(self) -> bool:
        return self.tokenizer_2 is not None

    @property
    def text_encoder_names(self) -> tuple[str, ...]:
        return ("text_encoder", "text_encoder_2") if self.is_sdxl else ("text_encoder",)

    @property
    def tokenizers(self) -> list:
        return [self.tokenizer, self.tokenizer_2] if self.is_sdxl else [self.tokenizer]


def is_sdxl_folder(path: Path) -> bool:
    """An SDXL pipeline folder has a second tokenizer and text encoder."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return "text_encoder_2" in index and index.get("text_encoder_2", [None])[0] is not None


def native_resolution(path: Path) -> int:
    """The model's native image size, from its configs (no weights loaded): the UNet's sample
    size times the VAE's downsampling factor."""
    try:
        unet = json.loads((Path(path) / "unet" / "config.json").read_text())
        vae = json.loads((Path(path) / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise AdaptError(f"cannot read the UNet/VAE config in {path} ({e}); pass a complete diffusers model folder") from None


def assemble_pipeline(sdxl: bool, parts: dict | None = None, *, folder=None, dtype=None):
    """THE place that builds a StableDiffusionPipeline / StableDiffusionXLPipeline: from `parts` in
    memory (vae, unet, scheduler, text_encoder[_2], tokenizer[_2]), or loaded from a pipeline
    `folder` in `dtype`. SD 1.x/2.x pipelines come without a safety checker."""
    # lazy: LIGHT module (plan resolves the model before argument errors)
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    no_checker = {} if sdxl else {"safety_checker": None, "requires_safety_checker": False}
    if folder is not None:
        return cls.from_pretrained(folder, torch_dtype=dtype, **no_checker)
    return cls(**parts, **no_checker, **({} if sdxl else {"feature_extractor": None}))


def load_components(model: str | None, device: str = "cpu", dtype=None) -> Components:
    """Load tokenizer(s), text encoder(s), VAE, UNet and the training noise scheduler, all frozen.
    An SDXL folder (tokenizer_2 / text_encoder_2) is detected from model_index.json."""
    import torch  # lazy: LIGHT module (plan resolves the model before argument errors)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    quiet_libraries(loaded=True)
    dtype = dtype or torch.float32
    path = resolve_model(model)
    sdxl = is_sdxl_folder(path)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2") if sdxl else None
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype) if sdxl else None
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise AdaptError(f"could not load the model in {path}: {str(e).splitlines()[0]}") from None
    for m in (text_encoder, text_encoder_2, vae, unet):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
            m.to(device)
    return Components(tokenizer, text_encoder, vae, unet, noise_scheduler, path, tokenizer_2, text_encoder_2)


# --- tiny models for tests and benchmarks -------------------------------------------------------

TINY_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
    block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
    attention_head_dim=8, norm_num_groups=32,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=16,
    block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, sample_size=16,
)
TINY_TEXT = dict(
    vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
# The real architectures, for benchmarks and name tests (random weights; nothing downloaded).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14 text tower
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SDXL_TEXT_2 = dict(  # OpenCLIP bigG/14 text tower (SDXL's second encoder; its first is SD15_TEXT's CLIP-L)
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407,
    pad_token_id=49407,
)
SD15_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, steps_offset=1, prediction_type="epsilon",
)


def build_pipeline_folder(out_dir: str | Path, unet: dict, vae: dict, text: dict, seed: int = 0,
                          prediction_type: str = "epsilon") -> Path:
    """Write a randomly initialised StableDiffusionPipeline folder built from configs.

    Used for tests (tiny), benchmarks (the real SD 1.5 architecture) and the bundled base model's
    starting point. The tokenizer is the real CLIP one shipped with the package.
    """
    import torch  # lazy: LIGHT module (plan resolves the model before argument errors)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    pipe = assemble_pipeline(False, dict(
        vae=AutoencoderKL(**vae),
        text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=UNet2DConditionModel(**unet),
        scheduler=DDPMScheduler(**{**SD15_SCHEDULER, "prediction_type": prediction_type}),
    ))
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def build_tiny_pipeline(out_dir: str | Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A ~2M-parameter SD-layout model: 16 px images, 8x8x4 latents. Runs a training step in ms."""
    return build_pipeline_folder(out_dir, TINY_UNET, TINY_VAE, TINY_TEXT, seed, prediction_type)


TINY_SDXL_UNET = dict(  # two resnets per level, as every SD/SDXL UNet (Stability's block numbering assumes it)
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 32,
)


def build_tiny_sdxl_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL-layout model: two CLIP text encoders (the second with a projection, 32-d pooled
    output), a UNet with text_time added conditioning; 16 px images. For tests only."""
    import torch  # lazy: LIGHT module (plan resolves the model before argument errors)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    pipe = assemble_pipeline(True, dict(
        vae=AutoencoderKL(**TINY_VAE, force_upcast=True),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT)),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT, projection_dim=32)),
        tokenizer=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        tokenizer_2=CLIPTokenizer.from_pretrained(TOKENIZER_DIR),
        unet=UNet2DConditionModel(**TINY_SDXL_UNET),
        scheduler=DDPMScheduler(**SD15_SCHEDULER),
    ))
    pipe.save_pretrained(out_dir)
    return Path(out_dir)
