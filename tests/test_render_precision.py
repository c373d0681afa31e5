"""Class images and validation renders (issue 16, item 5): batched, in the run's precision, the
VAE decoding the whole batch in one call and in fp32 where fp16 would overflow; the same seed
gives the same image at any batch size in each precision."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import adapt.infer
from adapt.infer import generate, load_pipeline
from conftest import run


def watch(pipe) -> tuple[dict, list]:
    """Hooks recording the UNet's compute dtype (its first conv's output) and every VAE decoder
    call's (batch size, input dtype, output dtype); returns (record, hook handles)."""
    seen = {"unet": set(), "decoder": []}
    handles = [pipe.unet.conv_in.register_forward_hook(lambda m, i, o: seen["unet"].add(o.dtype)),
               pipe.vae.decoder.register_forward_hook(lambda m, i, o: seen["decoder"].append((i[0].shape[0], i[0].dtype, o.dtype)))]
    return seen, handles


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_same_seed_same_image_at_batch_sizes_1_and_4_in_each_precision(tiny_model, dtype):
    """fp16 keeps the VAE fp32 and still renders (the UNet's fp16 latents are cast on the way in);
    bf16 runs wholly in bf16. The four images decode in one VAE call. A seed's image is the same at
    batch size 1 and 4 to within one level of 255: some CPUs' kernels round differently by batch shape
    (on an AMD EPYC, this model in bf16: 19 of 768 values 1 apart; the bundled base even in fp32: 1),
    while another seed's image differs by 45-47 levels on average."""
    pipe = load_pipeline(str(tiny_model), "dpm++2m-karras", device="cpu", dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.text_encoder.dtype == dtype
    assert pipe.vae.dtype == (torch.float32 if dtype == torch.float16 else dtype)
    seen, _ = watch(pipe)
    one = np.asarray(generate(pipe, ["a cat"], [2], steps=3, size=16)[0])
    many = [np.asarray(im) for im in generate(pipe, ["a cat"] * 4, [0, 1, 2, 3], steps=3, size=16, batch_size=4)]
    gap = [np.abs(one.astype(int) - m.astype(int)) for m in many]
    assert gap[2].max() <= 1, gap[2].max()  # seed 2 in a batch of 4 is seed 2 alone
    assert min(gap[i].mean() for i in (0, 1, 3)) > 20, [g.mean() for g in gap]  # other seeds, other images
    assert seen["unet"] == {dtype}
    assert seen["decoder"] == [(1, pipe.vae.dtype, pipe.vae.dtype), (4, pipe.vae.dtype, pipe.vae.dtype)]
    assert len({im.tobytes() for im in many}) == 4  # four seeds, four images


def test_the_vae_decodes_in_fp32_under_a_low_precision_autocast(tiny_model):
    """Validation renders run under the training's autocast: the UNet computes in it, the fp32 VAE
    decodes in fp32 (fp16 would overflow there), and the image equals the plain fp32 render
    up to the UNet's bf16 rounding, not a black or NaN one."""
    pipe = load_pipeline(str(tiny_model), "euler", device="cpu", dtype=torch.float32)
    seen, _ = watch(pipe)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image = np.asarray(generate(pipe, ["a cat", "a dog"], [0, 1], steps=3, size=16)[0], dtype=float)
    assert seen["unet"] == {torch.bfloat16}
    assert seen["decoder"] == [(2, torch.float32, torch.float32)]
    plain = np.asarray(generate(pipe, ["a cat"], [0], steps=3, size=16)[0], dtype=float)
    assert np.abs(image - plain).mean() < 8


def test_class_images_render_in_the_runs_precision(tiny_model, concept_dir, tmp_path, monkeypatch):
    """--mixed-precision bf16: the class-image pipeline's UNet runs in bf16 (and each image's
    manifest entry says so); the VAE decodes each batch in one call."""
    seen = {}
    real_load = adapt.infer.load_pipeline

    def spying_load(*a, **k):
        pipe = real_load(*a, **k)
        seen["pipe"], seen["hooks"] = pipe, watch(pipe)
        return pipe

    monkeypatch.setattr(adapt.infer, "load_pipeline", spying_load)
    code, log = run("dreambooth", "--lora", "--images", concept_dir, "--token", "<t>", "--class-word", "cat",
                    "--num-class-images", "3", "--class-steps", "2", "--class-images", tmp_path / "class",
                    "--mixed-precision", "bf16", "--model", tiny_model, "--steps", "1", "--resolution", "16",
                    "--output", tmp_path / "run")
    assert code == 0, log
    record = seen["hooks"][0]
    assert seen["pipe"].unet.dtype == torch.bfloat16 and record["unet"] == {torch.bfloat16}
    assert [b for b, _, _ in record["decoder"]] == [3]  # the whole batch (8 by default) in one decode
    manifest = json.loads((tmp_path / "class" / "manifest.json").read_text())
    assert [e["dtype"] for e in manifest["images"]] == ["bfloat16"] * 3


def test_validation_renders_in_the_runs_precision(tiny_model, concept_dir, tmp_path, monkeypatch):
    """--mixed-precision bf16 --validation-prompt x2: the UNet renders in bf16, the two images
    decode in one fp32 VAE call."""
    records = []
    real_generate = adapt.infer.generate

    def spying_generate(pipe, *a, **k):
        seen, handles = watch(pipe)
        records.append(seen)
        try:
            return real_generate(pipe, *a, **k)
        finally:
            for h in handles:
                h.remove()

    monkeypatch.setattr(adapt.infer, "generate", spying_generate)
    code, log = run("lora", "--images", concept_dir, "--token", "<t>", "--model", tiny_model, "--steps", "1",
                    "--resolution", "16", "--mixed-precision", "bf16", "--validation-prompt", "a <t>",
                    "--validation-prompt", "a dog", "--validation-steps", "2", "--output", tmp_path / "run")
    assert code == 0, log
    assert records and all(r["unet"] == {torch.bfloat16} for r in records)
    assert all(r["decoder"] == [(2, torch.float32, torch.float32)] for r in records)
    assert (tmp_path / "run" / "validation" / "final.png").is_file()
