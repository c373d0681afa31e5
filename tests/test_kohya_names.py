"""kohya's module names (lora_unet_*, lora_te*_*) on the real SD 1.5 and SDXL architectures: every Linear/Conv2d
round-trips, and an SDXL file uses sd-scripts' Stability block numbering."""

from __future__ import annotations

import torch

from adapt.lora_names import from_kohya_name, is_module_key, module_key, to_kohya_name
from adapt.loras import read_lora


def _module_names(module):
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _real_architectures():
    """Module names of every Linear/Conv2d of the real SD 1.5 and SDXL UNets and text encoders (meta device)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from adapt.models import SD15_TEXT, SD15_UNET, SDXL_TEXT_2, SDXL_UNET

    with init_empty_weights():
        sd15 = {"unet": UNet2DConditionModel(**SD15_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT))}
        sdxl = {"unet": UNet2DConditionModel(**SDXL_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**SD15_TEXT)),
                "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**SDXL_TEXT_2))}
    return {name: [module_key(c, n) for c, m in model.items() for n in _module_names(m)]
            for name, model in (("sd15", sd15), ("sdxl", sdxl))}


def test_kohya_names_round_trip_on_the_real_architectures():
    keys = _real_architectures()
    assert len(keys["sdxl"]) == 794 + 72 + 193 and len(keys["sd15"]) == 282 + 72  # every Linear/Conv2d
    for arch, sdxl_names in (("sd15", False), ("sdxl", True), ("sdxl", False)):  # SDXL: both UNet layouts read back
        names = {to_kohya_name(k, sdxl_names) for k in keys[arch]}
        assert len(names) == len(keys[arch])
        for key in keys[arch]:
            assert is_module_key(key) and from_kohya_name(to_kohya_name(key, sdxl_names)) == key, key
    assert to_kohya_name("unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q") == \
        "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q"
    assert to_kohya_name("text_encoder.encoder.layers.3.self_attn.k_proj") == \
        "lora_te_text_model_encoder_layers_3_self_attn_k_proj"
    assert to_kohya_name("text_encoder.encoder.layers.3.self_attn.k_proj", sdxl=True) == \
        "lora_te1_text_model_encoder_layers_3_self_attn_k_proj"
    assert to_kohya_name("text_encoder_2.text_projection", sdxl=True) == "lora_te2_text_projection"
    assert from_kohya_name("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_qq") is None
    assert from_kohya_name("lora_unet_input_blocks_3_1_proj_in") is None  # input_blocks.3 is a downsampler


# kohya's SDXL UNet (sd-scripts library/sdxl_original_unet.py, Stability's sd_xl_base): transformer
# depth of each attention block, and hand-checked names from its Stability <-> diffusers block map.
KOHYA_SDXL_ATTENTION = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10, "input_blocks_8_1": 10,
                        "middle_block_1": 10, **{f"output_blocks_{b}_1": 10 for b in (0, 1, 2)},
                        **{f"output_blocks_{b}_1": 2 for b in (3, 4, 5)}}
KOHYA_SDXL_NAMES = {
    "unet.down_blocks.0.resnets.0.conv1": "input_blocks_1_0_in_layers_2",
    "unet.down_blocks.0.downsamplers.0.conv": "input_blocks_3_0_op",
    "unet.down_blocks.2.resnets.0.conv_shortcut": "input_blocks_7_0_skip_connection",
    "unet.mid_block.resnets.1.time_emb_proj": "middle_block_2_emb_layers_1",
    "unet.up_blocks.1.upsamplers.0.conv": "output_blocks_5_2_conv",
    "unet.up_blocks.2.resnets.2.conv2": "output_blocks_8_0_out_layers_3",
    "unet.conv_in": "input_blocks_0_0", "unet.time_embedding.linear_2": "time_embed_2",
    "unet.add_embedding.linear_1": "label_emb_0_0", "unet.conv_out": "out_2",
}


def test_sdxl_kohya_file_has_kohyas_block_numbering_and_reads_back(tmp_path):
    from safetensors import safe_open

    from adapt.loras import Lora, write_lora

    keys = _real_architectures()["sdxl"]
    # every attention Linear + every text-encoder layer's q/k/v/out/fc1/fc2: a full sd-scripts SDXL LoRA (986 modules)
    modules = [k for k in keys if ".attentions." in k or (k.startswith("text_encoder") and ".layers." in k)]
    path = write_lora(tmp_path / "sdxl.safetensors", {k: Lora(torch.ones(1, 1), torch.ones(1, 1), 1.0) for k in modules},
                      "kohya")
    with safe_open(str(path), "pt") as f:
        names, meta = {k.split(".")[0] for k in f.keys()}, f.metadata()
    leaves = [f"attn{a}_{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out_0")] + ["ff_net_0_proj", "ff_net_2"]
    expected = {f"lora_unet_{block}_{leaf}" for block, depth in KOHYA_SDXL_ATTENTION.items()
                for leaf in ["proj_in", "proj_out"] + [f"transformer_blocks_{t}_{x}" for t in range(depth) for x in leaves]}
    assert {n for n in names if n.startswith("lora_unet_")} == expected and len(expected) == 722
    layers = [f"_self_attn_{x}_proj" for x in ("q", "k", "v", "out")] + ["_mlp_fc1", "_mlp_fc2"]
    assert {n for n in names if n.startswith("lora_te")} == {
        f"lora_te{i}_text_model_encoder_layers_{n}{x}" for i, depth in ((1, 12), (2, 32)) for n in range(depth) for x in layers}
    assert len(names) == 986 and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert read_lora(path)[0].keys() == set(modules)
    for key, name in KOHYA_SDXL_NAMES.items():
        assert to_kohya_name(key, sdxl=True) == f"lora_unet_{name}" and from_kohya_name(f"lora_unet_{name}") == key
