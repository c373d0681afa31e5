"""--dry-run (issue 18 item 2): settings with their sources, the data, an estimate; nothing trained.
And the estimate's parts against what the model really holds."""

from __future__ import annotations

import pytest
from conftest import run

from adapt.estimate import component_tensors, estimate, trainable_count, unet_volume


def test_dry_run_prints_settings_data_and_estimate_and_writes_nothing(tiny_model, concept_dir, tmp_path):
    out = tmp_path / "run"
    code, text = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out,
                     "--steps", "8", "--batch-size", "2", "--rank", "8", "--dry-run")
    assert code == 0, text
    assert not out.exists()
    assert "  [train] steps = 8  <- flag" in text and "  [lora] rank = 8  <- flag" in text
    assert "  [train] lr = 0.0001  <- default" in text
    n = len([p for p in concept_dir.iterdir() if p.suffix == ".png"])
    assert f"{n} images in {concept_dir}" in text and f"8 steps x 2 images = {16 / n:.1f} epochs" in text
    assert "peak memory ~" in text and "s per micro-step" in text and "calibrated on measured CPU runs" in text


def test_dry_run_reports_the_same_errors_as_a_run(tiny_model, tmp_path):
    code, text = run("lora", "--images", tmp_path / "missing", "--token", "<sks>", "--model", tiny_model, "--dry-run")
    assert code != 0 and "does not exist" in text


def test_a_real_run_prints_its_settings_first(tiny_model, concept_dir, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="adapt"):
        code, text = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output",
                         tmp_path / "run", "--steps", "2", "--resolution", "16")
    assert code == 0, text
    logged = caplog.text
    assert "settings not at adapt's defaults" in logged and "  [train] steps = 2  <- flag" in logged
    assert logged.index("[train] steps = 2") < logged.index("training lora for 2 steps")


def test_estimate_counts_what_the_model_holds(tiny_model):
    """Parameter counts from the safetensors headers equal the loaded model's; the LoRA count equals
    what peft adds; activations and work grow with the resolution; checkpointing cuts activations."""
    from peft import LoraConfig as PeftLoraConfig

    from adapt.models import load_components

    unet_header = component_tensors(tiny_model, "unet")
    unet = load_components(str(tiny_model)).unet
    assert trainable_count(unet_header, "full", [], 4) == sum(p.numel() for p in unet.parameters())
    unet.add_adapter(PeftLoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"]))
    lora = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert trainable_count(unet_header, "lora", ["to_q", "to_k"], 4) == lora
    (m8, v8), (m16, v16) = unet_volume(unet_header, (8, 8), 2), unet_volume(unet_header, (16, 16), 2)
    assert 3.5 < v16 / v8 <= 4 and m16 / m8 > 3.5
    plain = estimate(tiny_model, kind="lora", resolution=64, batch=1)
    ckpt = estimate(tiny_model, kind="lora", resolution=64, batch=1, checkpointing=True)
    assert ckpt.parts["activations"] < plain.parts["activations"] and ckpt.seconds_per_step > plain.seconds_per_step
    full = estimate(tiny_model, kind="full", resolution=64, batch=2, optimizer="adamw")
    assert full.parts["optimizer"] == 2 * full.parts["gradients"] == 2 * 4 * trainable_count(unet_header, "full", [], 4)
    assert estimate(tiny_model, kind="full", resolution=64, batch=2, optimizer="adamw8bit").parts["optimizer"] < full.parts["optimizer"]
    ema = estimate(tiny_model, kind="full", resolution=64, batch=2, ema=True)  # one more fp32 copy of what trains
    assert ema.parts["optimizer"] == full.parts["optimizer"] + full.parts["gradients"]


@pytest.mark.parametrize("gpu", ["NVIDIA H100 80GB HBM3", "Tesla T4"])
def test_gpu_estimates_say_they_are_uncalibrated(tiny_model, gpu):
    est = estimate(tiny_model, kind="lora", resolution=64, batch=1, device="cuda", gpu_name=gpu, precision="bf16")
    assert not est.calibrated and est.seconds_per_step > 0
