"""LoRA interop: kohya <-> diffusers layouts, several LoRAs with weights, fusing, merging."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.infer import generate, load_pipeline
from adapt.loras import combine, read_lora
from adapt.lowrank import reduce_rank
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

PROMPT = "a photo of <sks>"


def _train_lora(model, images, out, **lora):
    train(load_components(model), LoraMethod(LoraConfig(**lora)), instance_examples(images, "<sks>", "a photo of {token}"),
          TrainConfig(steps=20, lr=2e-2), out, resolution=16, progress=False)
    return out / "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def two_loras(tiny_model, concept_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    a = _train_lora(tiny_model, concept_dir, root / "a", rank=4, targets="q,k")
    b = _train_lora(tiny_model, concept_dir, root / "b", rank=2, alpha=4.0, targets="q,k,v,out", train_text_encoder=True)
    return str(a), str(b)


def _images(model, loras, fuse=False, seed=0):
    pipe = load_pipeline(str(model), "euler", loras=loras, fuse=fuse)
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(pipe, [PROMPT] * 2, [seed, seed + 1], steps=4)])


def _unet_out(model, loras, fuse=False):
    pipe = load_pipeline(str(model), "euler", loras=loras, fuse=fuse)
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 700]), hidden).sample


def _text_out(model, loras, fuse=False):
    pipe = load_pipeline(str(model), "euler", loras=loras, fuse=fuse)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]


def test_kohya_file_gives_the_same_images_in_adapt_and_plain_diffusers(tiny_model, two_loras, tmp_path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from adapt.schedulers import make_scheduler

    a, _ = two_loras
    kohya = tmp_path / "a_kohya.safetensors"
    assert run("convert", a, "--to", "kohya", "--output", kohya)[0] == 0
    with safe_open(str(kohya), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in keys)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"

    ours = _images(tiny_model, [(a, 1.0)])
    via_kohya = _images(tiny_model, [(str(kohya), 1.0)])
    assert np.abs(ours - via_kohya).max() <= 1

    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = make_scheduler("euler", plain.scheduler.config)
    plain.load_lora_weights(str(kohya))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    theirs = np.stack([np.asarray(i, dtype=np.int16) for i in plain([PROMPT] * 2, num_inference_steps=4, generator=gens).images])
    assert np.abs(ours - theirs).max() <= 1

    back = tmp_path / "back.safetensors"
    assert run("convert", kohya, "--to", "diffusers", "--output", back)[0] == 0
    orig, _ = read_lora(a)
    again, _ = read_lora(back)
    assert orig.keys() == again.keys()
    assert all(torch.allclose(orig[k].delta(), again[k].delta(), atol=1e-7) for k in orig)


def test_lora_command_writes_both_layouts_by_default_and_format_picks_one(tiny_model, concept_dir, tmp_path):
    from safetensors import safe_open

    common = ["lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--steps", "2"]
    out = tmp_path / "catlora"
    code, log = run(*common, "--output", out)
    assert code == 0, log
    diffusers, kohya = read_lora(out / "pytorch_lora_weights.safetensors")[0], read_lora(out / "catlora.safetensors")[0]
    assert diffusers.keys() == kohya.keys() and all(k.startswith("unet.") for k in kohya)
    assert all(torch.equal(diffusers[k].delta(), kohya[k].delta()) for k in kohya)
    with safe_open(str(out / "catlora.safetensors"), "pt") as f:  # the layout ComfyUI's LoraLoader and A1111 read
        assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for k in f.keys())
        assert "adapt.recipe" in f.metadata()
    for fmt, present, absent in (("kohya", "kohya.safetensors", "pytorch_lora_weights.safetensors"),
                                 ("diffusers", "pytorch_lora_weights.safetensors", "diffusers.safetensors")):
        code, log = run(*common, "--format", fmt, "--output", tmp_path / fmt)
        assert code == 0, log
        assert (tmp_path / fmt / present).is_file() and not (tmp_path / fmt / absent).exists()


def test_several_loras_order_free_weight_zero_and_fused(tiny_model, two_loras):
    a, b = two_loras
    ab = _images(tiny_model, [(a, 0.7), (b, 0.4)])
    ba = _images(tiny_model, [(b, 0.4), (a, 0.7)])
    assert np.array_equal(ab, ba)
    assert np.array_equal(_images(tiny_model, [(a, 0.7), (b, 0.0)]), _images(tiny_model, [(a, 0.7)]))
    # fused: the same outputs within fp32 tolerance
    assert torch.allclose(_unet_out(tiny_model, [(a, 0.7), (b, 0.4)]), _unet_out(tiny_model, [(a, 0.7), (b, 0.4)], fuse=True),
                          atol=1e-5)
    assert np.abs(ab - _images(tiny_model, [(a, 0.7), (b, 0.4)], fuse=True)).max() <= 1


def test_merged_file_is_exactly_the_weighted_sum(tiny_model, two_loras, tmp_path):
    a, b = two_loras
    la, lb = read_lora(a)[0], read_lora(b)[0]
    assert any(k.startswith("text_encoder.") for k in lb)  # B has text-encoder modules too
    out = tmp_path / "ab.safetensors"
    code, log = run("merge", "--lora", f"{a}:0.7", "--lora", f"{b}:0.4", "--output", out)
    assert code == 0, log
    merged, _ = read_lora(out)
    assert merged.keys() == la.keys() | lb.keys()
    for k in merged:
        expected = sum(w * lo[k].delta() for lo, w in ((la, 0.7), (lb, 0.4)) if k in lo)
        assert torch.allclose(merged[k].delta(), expected, atol=1e-6), k
    assert torch.allclose(_unet_out(tiny_model, [(str(out), 1.0)]), _unet_out(tiny_model, [(a, 0.7), (b, 0.4)]), atol=1e-5)

    # rank reduction: at the full rank nothing is lost, below it the printed error is the SVD's
    full_rank = max(lo.rank for lo in merged.values())  # ranks differ by module: A's and B's modules differ
    assert reduce_rank(merged, full_rank)[1] < 1e-6
    low, err = reduce_rank(merged, 1)
    assert 0 < err < 1
    code, log = run("merge", "--lora", f"{a}:0.7", "--lora", f"{b}:0.4", "--output", tmp_path / "r1.safetensors",
                    "--rank", "1")
    assert code == 0 and f"{err:.6f}" in log
    k = next(iter(low))
    s = torch.linalg.svdvals(merged[k].delta().flatten(1).double())
    assert torch.allclose(torch.linalg.norm(merged[k].delta() - low[k].delta()).double(), torch.sqrt((s[1:] ** 2).sum()),
                          rtol=1e-4)


def test_merge_into_model_loads_in_plain_diffusers(tiny_model, two_loras, tmp_path):
    from diffusers import StableDiffusionPipeline

    a, b = two_loras
    out = tmp_path / "fused-model"
    code, log = run("merge", "--lora", f"{a}:0.7", "--lora", f"{b}:0.4", "--into-model", out, "--model", tiny_model)
    assert code == 0, log
    StableDiffusionPipeline.from_pretrained(out, safety_checker=None, requires_safety_checker=False)
    assert torch.allclose(_unet_out(out, []), _unet_out(tiny_model, [(a, 0.7), (b, 0.4)]), atol=1e-5)
    assert np.abs(_images(out, []) - _images(tiny_model, [(a, 0.7), (b, 0.4)])).max() <= 1
    # B's text-encoder LoRA is applied (not silently dropped) and fused into the saved text encoder
    with_b = _text_out(tiny_model, [(b, 0.4)])
    assert not torch.allclose(with_b, _text_out(tiny_model, []), atol=1e-4)
    assert torch.allclose(_text_out(out, []), _text_out(tiny_model, [(a, 0.7), (b, 0.4)]), atol=1e-5)
    code, log = run("merge", "--lora", a, "--into-model", out, "--model", tiny_model)
    assert code == 2 and "already exists" in log


def test_merge_errors(two_loras, tmp_path):
    a, _ = two_loras
    assert "exactly one of" in run("merge", "--lora", a)[1]
    assert "nothing to merge" in run("merge", "--output", tmp_path / "x.safetensors")[1]
    assert "choose one of: diffusers, kohya" in run("convert", a, "--to", "ckpt", "--output", tmp_path / "y")[1]
    wrong = {"unet.x.lora.down.weight": torch.zeros(2, 8), "unet.x.lora.up.weight": torch.zeros(4, 2)}
    other = {"unet.x.lora.down.weight": torch.zeros(2, 9), "unet.x.lora.up.weight": torch.zeros(4, 2)}
    from adapt.loras import Lora

    with pytest.raises(AdaptError, match="disagree on the shape"):
        combine([({"unet.x": Lora(wrong["unet.x.lora.down.weight"], wrong["unet.x.lora.up.weight"], 2.0)}, 1.0),
                 ({"unet.x": Lora(other["unet.x.lora.down.weight"], other["unet.x.lora.up.weight"], 2.0)}, 1.0)])


def test_keys_that_fit_no_module_stop_convert_merge_and_generate_unless_lenient(tiny_model, two_loras, tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    a, _ = two_loras
    kohya = tmp_path / "a_kohya.safetensors"
    assert run("convert", a, "--to", "kohya", "--output", kohya)[0] == 0
    tensors = load_file(str(kohya))
    bad = {"lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_qx.lora_down.weight": torch.zeros(1, 32),
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_qx.lora_up.weight": torch.zeros(32, 1),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks": torch.zeros(32, 1)}
    mixed = tmp_path / "mixed.safetensors"
    save_file({**tensors, **bad}, str(mixed))
    expected = set(read_lora(a)[0])

    out = tmp_path / "converted.safetensors"
    code, log = run("convert", mixed, "--to", "diffusers", "--output", out)
    assert code == 2 and str(mixed) in log and "3 of" in log and "to_qx" in log and "--lenient" in log and not out.exists()
    code, log = run("merge", "--lora", mixed, "--output", out)
    assert code == 2 and str(mixed) in log and not out.exists()
    code, log = run("generate", PROMPT, "--model", tiny_model, "--steps", "1", "--lora", mixed, "--output", tmp_path / "g")
    assert code == 2 and str(mixed) in log and not (tmp_path / "g").exists()
    with caplog.at_level("WARNING", logger="adapt"):
        assert run("convert", mixed, "--to", "diffusers", "--output", out, "--lenient")[0] == 0
        assert run("merge", "--lora", mixed, "--output", tmp_path / "m.safetensors", "--lenient")[0] == 0
    assert "left out 3 of" in caplog.text
    assert set(read_lora(out)[0]) == set(read_lora(tmp_path / "m.safetensors")[0]) == expected

    # a module every SD UNet may have but this one lacks: an error naming the user's file (not a temporary copy)
    other = tmp_path / "other.safetensors"
    extra = "lora_unet_down_blocks_3_attentions_0_proj_in"
    save_file({**tensors, f"{extra}.lora_down.weight": torch.zeros(1, 32), f"{extra}.lora_up.weight": torch.zeros(32, 1)},
              str(other))
    with pytest.raises(AdaptError, match=f"{other}: 1 of {len(expected) + 1} LoRA modules fit no module of this model"):
        load_pipeline(str(tiny_model), "euler", loras=[(str(other), 1.0)])
    lenient = load_pipeline(str(tiny_model), "euler", loras=[(str(other), 1.0)], lenient=True)
    ours = generate(lenient, [PROMPT] * 2, [0, 1], steps=4)
    assert np.array_equal(np.stack([np.asarray(i, dtype=np.int16) for i in ours]), _images(tiny_model, [(a, 1.0)]))


def test_merge_into_model_keeps_the_base_scheduler_and_standard_clip_keys(tiny_model, two_loras, tmp_path,
                                                                         standard_clip_keys):
    import json
    import shutil

    _, b = two_loras  # with a text-encoder LoRA: the text encoder is saved too
    base = tmp_path / "base"
    shutil.copytree(tiny_model, base)
    (base / "adapt.json").write_text(json.dumps({"guidance": 3.0}))
    out = tmp_path / "fused"
    code, log = run("merge", "--lora", f"{b}:0", "--into-model", out, "--model", base)
    assert code == 0, log
    assert (out / "scheduler" / "scheduler_config.json").read_bytes() == (base / "scheduler" / "scheduler_config.json").read_bytes()
    assert json.loads((out / "model_index.json").read_text())["scheduler"] == \
        json.loads((base / "model_index.json").read_text())["scheduler"]
    assert json.loads((out / "adapt.json").read_text()) == {"guidance": 3.0}
    standard_clip_keys(out / "text_encoder")
    # weight 0 fused: the folder samples exactly like its base, with any scheduler
    fused = generate(load_pipeline(str(out), "ddim"), [PROMPT], [0], steps=4)[0]
    assert np.array_equal(np.asarray(fused), np.asarray(generate(load_pipeline(str(base), "ddim"), [PROMPT], [0], steps=4)[0]))
