"""SDXL: the same loop, methods and inference module on a tiny SDXL-layout model (two text
encoders, pooled text embeddings, size/crop time ids), with the same parity tests as SD 1.x."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from adapt.encode import size_conditioning
from adapt.infer import generate, load_pipeline
from adapt.loras import read_lora
from adapt.models import build_tiny_sdxl_pipeline, load_components
from conftest import run

PROMPT = "a photo of <sks>"


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl") / "model")


def _plain(model):
    from diffusers import StableDiffusionXLPipeline

    from adapt.schedulers import make_scheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plain_images(pipe, prompt, seeds=(0, 1)):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return np.stack([np.asarray(i, dtype=np.int16) for i in pipe([prompt] * len(seeds), num_inference_steps=4, guidance_scale=7.5, generator=gens).images])


def _ours(model, prompt, seeds=(0, 1), **kw):
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(load_pipeline(str(model), "euler", **kw), [prompt] * len(seeds),
                                                                      list(seeds), steps=4)])


def test_conditioning_is_made_in_one_place(sdxl, concept_dir):
    from adapt.data import Example, crop_geometry
    from adapt.encode import encode_prompts, tokenize

    c = load_components(str(sdxl))
    assert c.is_sdxl and c.text_encoder_names == ("text_encoder", "text_encoder_2")
    cond = encode_prompts(c, tokenize(c, "a cat"))
    assert cond["encoder_hidden_states"].shape == (1, 77, 64) and cond["text_embeds"].shape == (1, 32)
    # a 24x24 image trained at 16x16: scaled to 16, no crop; time ids = (24, 24, 0, 0, 16, 16)
    ex = Example(sorted(concept_dir.glob("*.png"))[0], "x")
    ids = size_conditioning(c, *crop_geometry(ex, (16, 16)), (16, 16))["time_ids"]
    assert ids.tolist() == [24, 24, 0, 0, 16, 16]
    assert size_conditioning(c, (8, 8), (1, 2), (3, 4))["time_ids"].tolist() == [8, 8, 1, 2, 3, 4]


def test_sdxl_lora_base_unchanged_and_plain_diffusers_parity(sdxl, concept_dir, tmp_path):
    out = tmp_path / "lora"
    code, log = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", sdxl, "--steps", "6", "--lr", "2e-2",
                    "--train-text-encoder", "--output", out)
    assert code == 0, log
    lora = out / "pytorch_lora_weights.safetensors"
    loras, _ = read_lora(lora)
    prefixes = {k.split(".")[0] for k in loras}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all(k.endswith(("to_q", "to_k", "q_proj", "k_proj")) for k in loras)

    ours = _ours(sdxl, PROMPT, loras=[(str(lora), 1.0)])
    plain = _plain(sdxl)
    plain.load_lora_weights(str(lora))
    assert np.array_equal(ours, _plain_images(plain, PROMPT))
    assert np.abs(ours - _ours(sdxl, PROMPT)).mean() > 0.5  # the LoRA changes the images
    assert np.array_equal(_ours(sdxl, PROMPT, loras=[(str(lora), 0.0)]), _ours(sdxl, PROMPT))  # weight 0 = base

    # kohya layout: lora_te1_ / lora_te2_ prefixes; adapt generate gives the same images with it
    kohya = tmp_path / "k.safetensors"
    assert run("convert", lora, "--to", "kohya", "--output", kohya)[0] == 0
    from safetensors import safe_open

    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in keys} == {"lora_unet", "lora_te1", "lora_te2"}
    # UNet blocks in Stability's layout, as kohya's SDXL trainer writes them (sdxl_merge_lora.py finds them)
    unet_keys = [k for k in keys if k.startswith("lora_unet_")]
    assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for k in unet_keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert np.abs(_ours(sdxl, PROMPT, loras=[(str(kohya), 1.0)]) - ours).max() <= 1

    # a UNet LoRA in kohya layout loads in plain diffusers too (its own Stability -> diffusers block
    # map), with the same images. (diffusers' kohya reader cannot place q/k-only text-encoder LoRAs,
    # so that part is checked through adapt)
    unet_only = tmp_path / "unet-only"
    assert run("lora", "--images", concept_dir, "--token", "<sks>", "--model", sdxl, "--steps", "4", "--lr", "2e-2",
               "--format", "kohya", "--output", unet_only)[0] == 0
    plain_k = _plain(sdxl)
    plain_k.load_lora_weights(str(unet_only / "unet-only.safetensors"))
    ours_k = _ours(sdxl, PROMPT, loras=[(str(unet_only / "unet-only.safetensors"), 1.0)])
    assert np.abs(_plain_images(plain_k, PROMPT) - ours_k).max() <= 1 and np.abs(ours_k - _ours(sdxl, PROMPT)).mean() > 0.5


def test_sdxl_textual_inversion_clip_l_clip_g(sdxl, concept_dir, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "ti"
    code, log = run("textual-inversion", "--images", concept_dir, "--token", "<disc>", "--init-token", "cat", "--model", sdxl,
                    "--steps", "3", "--lr", "5e-2", "--output", out)
    assert code == 0, log
    emb = load_file(str(out / "learned_embeds.safetensors"))
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape == (1, 32) and emb["clip_g"].shape == (1, 32)

    prompt = "a photo of <disc>"
    ours = _ours(sdxl, prompt, embeddings=[(str(out / "learned_embeds.safetensors"), None)])
    plain = _plain(sdxl)
    plain.load_textual_inversion(emb["clip_l"], token="<disc>", text_encoder=plain.text_encoder, tokenizer=plain.tokenizer)
    plain.load_textual_inversion(emb["clip_g"], token="<disc>", text_encoder=plain.text_encoder_2, tokenizer=plain.tokenizer_2)
    assert np.array_equal(ours, _plain_images(plain, prompt))


def test_sdxl_dreambooth_pipeline_loads_and_merge_eval_work(sdxl, concept_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "db"
    code, log = run("dreambooth", "--images", concept_dir, "--token", "sks", "--class-word", "disc", "--model", sdxl,
                    "--num-class-images", "2", "--class-steps", "2", "--steps", "2", "--lr", "1e-3", "--output", out)
    assert code == 0, log
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    base = StableDiffusionXLPipeline.from_pretrained(sdxl)
    assert any(not torch.equal(v, base.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    assert json.loads((out / "recipe.json").read_text())["method"] == "dreambooth"

    lora_out = tmp_path / "l"
    assert run("lora", "--images", concept_dir, "--token", "<sks>", "--model", sdxl, "--steps", "2", "--lr", "2e-2",
               "--output", lora_out)[0] == 0
    fused = tmp_path / "fused"
    code, log = run("merge", "--lora", f"{lora_out / 'pytorch_lora_weights.safetensors'}:0.5", "--into-model", fused, "--model", sdxl)
    assert code == 0, log
    assert np.abs(_ours(fused, PROMPT) - _ours(sdxl, PROMPT, loras=[(str(lora_out / "pytorch_lora_weights.safetensors"), 0.5)])).max() <= 1
    code, log = run("eval", "--prompt", PROMPT, "--num-images", "2", "--model", fused, "--compare-model", sdxl,
                    "--set", concept_dir, "--steps", "2", "--output", tmp_path / "ev")
    assert code == 0, log
    assert json.loads((tmp_path / "ev" / "eval.json").read_text())["drift"] > 0


def test_sdxl_vae_stays_fp32_in_fp16_pipelines(sdxl):
    pipe = load_pipeline(str(sdxl), "euler", device="cpu", dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.vae.dtype == torch.float32


def test_embedding_for_the_wrong_architecture_is_a_clear_error(sdxl, tmp_path):
    from safetensors.torch import save_file

    from adapt.errors import AdaptError

    sd_file = tmp_path / "sd.safetensors"
    save_file({"<x>": torch.zeros(1, 32)}, str(sd_file))
    with pytest.raises(AdaptError, match="one text encoder .* not for this model"):
        load_pipeline(str(sdxl), "euler", embeddings=[(str(sd_file), None)])


def test_sdxl_caches_train_like_no_cache_and_leave_the_base_bit_identical(sdxl, concept_dir, tmp_path):
    from adapt.config import LoraConfig
    from adapt.data import instance_examples
    from adapt.methods.lora import LoraMethod
    from adapt.train import train
    from adapt.train_config import TrainConfig

    ex = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    runs = {}
    for cache in (True, False):
        c = load_components(str(sdxl))
        before = {n: {k: v.clone() for k, v in getattr(c, n).state_dict().items()} for n in ("unet", "text_encoder_2")}
        cfg = TrainConfig(steps=4, batch_size=2, lr=1e-2, cache_latents=cache, cache_text=cache)
        runs[cache] = train(c, LoraMethod(LoraConfig()), ex, cfg, tmp_path / str(cache), resolution=16, progress=False)["losses"]
        if not cache:  # encoders stay in memory without caching: every base weight is unchanged
            unet = {k.replace(".base_layer", ""): v for k, v in c.unet.state_dict().items() if "lora_" not in k}
            assert all(torch.equal(unet[k], v) for k, v in before["unet"].items())
            te2 = c.text_encoder_2.state_dict()
            assert all(torch.equal(te2[k], v) for k, v in before["text_encoder_2"].items())
    assert np.allclose(runs[True], runs[False], rtol=1e-5)
