"""One name per LoRA-able module, and its spellings in the file layouts users trade.

In memory a module is `<component>.<diffusers module path>`, e.g.
`unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` or
`text_encoder.encoder.layers.3.self_attn.k_proj` (text-encoder paths without transformers' optional
`text_model.` prefix, as the installed CLIPTextModel names its modules). Kohya / A1111 / ComfyUI
files spell it `lora_unet_` + the UNet path with '.' -> '_', and `lora_te_` (SDXL: `lora_te1_`,
`lora_te2_`) + `text_model_` + the text-encoder path. For SDXL the UNet path is Stability's (the
layout of Stability's checkpoints, which kohya's SDXL trainer writes); for SD 1.x/2.x it is
diffusers' (which kohya's SD trainer writes). The reader takes either layout, key by key.

Stability's UNet numbers its blocks in one list per side. input_blocks.0 is conv_in; then each
level has LAYERS blocks of [resnet, attention] and, but for the last level, a downsampler block
(`.0.op`). output_blocks has LAYERS + 1 blocks per level, [resnet, attention, upsampler]; the
upsampler sits in slot 2 (slot 1 in a level without attention, e.g. SD 1.x's deepest). middle_block
is [resnet, attention, resnet]. Resnet layers in_layers.2 / emb_layers.1 / out_layers.3 /
skip_connection are diffusers' conv1 / time_emb_proj / conv2 / conv_shortcut; inside attention
blocks both layouts use the same names.
"""

from __future__ import annotations

import re

LAYERS = 2  # resnet blocks per down level in every SD 1.x/2.x and SDXL UNet (Stability's num_res_blocks)
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_TE1_PREFIX = "lora_te1_"  # kohya's name for the first text encoder of SDXL
SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version for SDXL, read by A1111 to file the LoRA under SDXL

_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
           "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2", "conv_out": "out.2"}
_RESNET_BACK = {v: k for k, v in _RESNET.items()}
_TOP_BACK = {v: k for k, v in _TOP.items()}
_STABILITY_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")

# Every Linear / Conv2d of a diffusers UNet2DConditionModel and of a transformers CLIP text encoder.
_ATTN = r"(?:proj_in|proj_out|transformer_blocks\.\d+\.(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.(?:0\.proj|2)))"
_RES = r"(?:conv1|conv2|time_emb_proj|conv_shortcut)"
UNET_PATH = re.compile(
    rf"conv_in|conv_out|(?:time|add)_embedding\.linear_[12]"
    rf"|(?:down_blocks|up_blocks)\.\d+\.(?:resnets\.\d+\.{_RES}|attentions\.\d+\.{_ATTN})"
    rf"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    rf"|mid_block\.(?:resnets\.\d+\.{_RES}|attentions\.\d+\.{_ATTN})")
TEXT_PATH = re.compile(r"encoder\.layers\.\d+\.(?:self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])|text_projection")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# Identifiers with underscores in diffusers, Stability and CLIP module paths (kohya names lose their dots).
_JOINED = sorted({
    "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out", "proj_in",
    "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "time_embedding", "add_embedding",
    "linear_1", "linear_2", "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "text_projection",
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "in_layers", "out_layers",
    "emb_layers", "skip_connection",
}, key=lambda s: (-s.count("_"), -len(s), s))


def module_key(component: str, path: str) -> str:
    """The in-memory key of a module: text-encoder paths lose transformers' `text_model.` prefix."""
    if component in TEXT_ENCODERS:
        path = path.removeprefix("text_model.")
    return f"{component}.{path}"


def is_module_key(key: str) -> bool:
    """Whether `key` names a Linear/Conv2d of an SD/SDXL UNet or a CLIP text encoder."""
    component, _, path = key.partition(".")
    pattern = UNET_PATH if component == "unet" else TEXT_PATH if component in TEXT_ENCODERS else None
    return pattern is not None and pattern.fullmatch(path) is not None


def to_stability(path: str) -> str:
    """A diffusers UNet module path in Stability's layout (`down_blocks.1.attentions.0.x` ->
    `input_blocks.4.1.x`). `path` must be a UNET_PATH."""
    if path in _TOP:
        return _TOP[path]
    side, _, rest = path.partition(".")
    if side == "mid_block":
        kind, j, rest = rest.split(".", 2)
        return f"middle_block.{1 if kind == 'attentions' else 2 * int(j)}.{_RESNET.get(rest, rest)}"
    level, kind, j, rest = rest.split(".", 3)
    i, j = int(level), int(j)
    rest = _RESNET.get(rest, rest)
    if side == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * (LAYERS + 1)}.0.op"
        return f"input_blocks.{1 + i * (LAYERS + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"
    if kind == "upsamplers":  # every SDXL level that upsamples has attention: slot 2
        return f"output_blocks.{i * (LAYERS + 1) + LAYERS}.2.conv"
    return f"output_blocks.{i * (LAYERS + 1) + j}.{0 if kind == 'resnets' else 1}.{rest}"


def from_stability(path: str) -> str | None:
    """Inverse of to_stability (also slot 1 upsamplers); None for a path no UNet has."""
    if path in _TOP_BACK:
        return _TOP_BACK[path]
    m = re.fullmatch(r"middle_block\.(\d+)\.(.+)", path)
    if m:
        n, rest = int(m[1]), m[2]
        if n == 1:
            return f"mid_block.attentions.0.{rest}"
        return f"mid_block.resnets.{n // 2}.{_RESNET_BACK[rest]}" if n in (0, 2) and rest in _RESNET_BACK else None
    m = re.fullmatch(r"(input|output)_blocks\.(\d+)\.(\d+)\.(.+)", path)
    if not m:
        return None
    side, k, slot, rest = m[1], int(m[2]), int(m[3]), m[4]
    if side == "input":
        if k == 0:
            return None
        i, j = divmod(k - 1, LAYERS + 1)
        if j == LAYERS:
            return f"down_blocks.{i}.downsamplers.0.conv" if (slot, rest) == (0, "op") else None
        side = "down_blocks"
    else:
        i, j = divmod(k, LAYERS + 1)
        if j == LAYERS and slot in (1, 2) and rest == "conv":
            return f"up_blocks.{i}.upsamplers.0.conv"
        side = "up_blocks"
    if slot == 0:
        return f"{side}.{i}.resnets.{j}.{_RESNET_BACK[rest]}" if rest in _RESNET_BACK else None
    return f"{side}.{i}.attentions.{j}.{rest}" if slot == 1 else None


def to_kohya_name(key: str, sdxl: bool = False) -> str:
    """`unet.<path>` -> `lora_unet_<path with _>` (Stability's path for SDXL), text encoders ->
    `lora_te_text_model_<path>` (SDXL: lora_te1_ / lora_te2_)."""
    component, path = key.split(".", 1)
    if component == "unet":
        return KOHYA_PREFIX["unet"] + (to_stability(path) if sdxl else path).replace(".", "_")
    prefix = SDXL_TE1_PREFIX if (component == "text_encoder" and sdxl) else KOHYA_PREFIX[component]
    if path != "text_projection":
        path = f"text_model.{path}"
    return prefix + path.replace(".", "_")


def from_kohya_name(name: str) -> str | None:
    """Inverse of to_kohya_name, for either UNet layout; None when the name is no module of an
    SD/SDXL UNet or CLIP text encoder."""
    for component, prefix in (*KOHYA_PREFIX.items(), ("text_encoder", SDXL_TE1_PREFIX)):
        if name.startswith(prefix):
            break
    else:
        return None
    pieces, rest = [], name[len(prefix):]
    while rest:
        for ident in _JOINED:
            if rest == ident or rest.startswith(ident + "_"):
                pieces.append(ident)
                rest = rest[len(ident) + 1:]
                break
        else:
            head, _, rest = rest.partition("_")
            pieces.append(head)
    path = ".".join(pieces)
    if component == "unet" and pieces and pieces[0] in _STABILITY_ROOTS:
        path = from_stability(path)
    key = module_key(component, path) if path else None
    return key if key and is_module_key(key) else None


def is_sdxl(keys, meta: dict | None = None) -> bool:
    """Whether LoRA modules are for SDXL: the metadata says so (kohya's ss_base_model_version,
    modelspec.architecture), there is a second text encoder, or attention at the UNet's deepest
    level (up_blocks.0: SDXL has it, SD 1.x/2.x do not)."""
    said = " ".join((meta or {}).get(k, "") for k in ("ss_base_model_version", "modelspec.architecture")).lower()
    if "xl" in said:
        return True
    return any(k.startswith(("text_encoder_2.", "unet.up_blocks.0.attentions.")) for k in keys)
