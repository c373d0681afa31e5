"""The new models of the initial pipeline, for init_pipeline.py: SD 1.x's CLIP token ids, the
configurations of the CLIP text encoder and the UNet, and SD 1.5's noise schedule."""

from __future__ import annotations

import torch

VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,  # not a DDPM argument; from_config keeps it in the saved config
    steps_offset=1,
    prediction_type="epsilon",
)


def text_config(hidden: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        projection_dim=hidden,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=EOS_ID,
    )


def unet_kwargs(layers_per_block: int, cross_attention_dim: int, sample_size: int = 16) -> dict:
    return dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 192),
        # cross-attention at every resolution level (16x16, 8x8, 4x4 latents) and in the mid block,
        # so attention-only LoRAs (Q,K by default) can steer coarse layout and fine detail alike
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=cross_attention_dim,
        layers_per_block=layers_per_block,
        attention_head_dim=4,  # legacy diffusers naming: number of heads (16-48 channels per head)
        norm_num_groups=32,
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def build_models(layers_per_block: int, hidden: int, seed: int, sample_size: int):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config(hidden))
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(**unet_kwargs(layers_per_block, hidden, sample_size))
    return text_encoder.eval(), unet.eval()
