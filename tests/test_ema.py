"""The moving average of the trained weights (--ema-decay, adapt/ema.py): the recursion, weights
that do not train, swapping it in and out, what is saved, and resume exactness."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from adapt.config import LoraConfig, TextualInversionConfig
from adapt.data import instance_examples
from adapt.ema import EMA, swapped
from adapt.errors import AdaptError
from adapt.methods.full import FullMethod
from adapt.methods.lora import LoraMethod
from adapt.methods.textual_inversion import TextualInversionMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

LORA = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"


def _by_hand(start, history, decay):
    """shadow_n = d_n * shadow_{n-1} + (1 - d_n) * w_n, d_n = min(decay, n / (n + 9)), in float64."""
    shadow = start.double()
    for n, w in enumerate(history, 1):
        d = min(decay, n / (n + 9))
        shadow = d * shadow + (1 - d) * w.double()
    return shadow


def test_update_follows_the_recursion_and_constant_weights_stay_bit_identical():
    torch.manual_seed(0)
    moving, still = torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7) * 1e3)
    start, fixed = moving.detach().clone(), still.detach().clone()
    ema = EMA({"moving": moving, "still": still}, 0.8)
    history = []
    for n in range(1, 41):  # d_n = n / (n + 9) up to n = 36, then 0.8
        with torch.no_grad():
            moving.add_(torch.randn(5, 3) * 0.1)
        history.append(moving.detach().clone())
        ema.update(n)
    assert ema.decay_at(1) == 0.1 and ema.decay_at(200) == 0.8
    assert torch.allclose(ema.shadow["moving"].double(), _by_hand(start, history, 0.8), rtol=0, atol=1e-6)
    assert torch.equal(ema.shadow["still"], fixed)  # a lerp between equal values is exact
    assert ema.shadow["moving"].dtype == torch.float32 and not torch.equal(ema.shadow["moving"], moving.detach())


def test_swapped_puts_the_average_in_and_the_trained_weights_back_exactly():
    w = torch.nn.Parameter(torch.randn(4, 4))
    trained = w.detach().clone()
    ema = EMA({"w": w}, 0.5, "cpu")
    with torch.no_grad():
        w.mul_(3)
    ema.update(100)
    raw = w.detach().clone()
    with swapped(ema):
        assert torch.equal(w.detach(), ema.shadow["w"]) and not torch.equal(w.detach(), raw)
    assert torch.equal(w.detach(), raw)
    with pytest.raises(RuntimeError, match="disk"), swapped(ema):
        raise RuntimeError("disk")
    assert torch.equal(w.detach(), raw) and not torch.equal(raw, trained)
    with swapped(None):  # no EMA: nothing happens
        assert torch.equal(w.detach(), raw)


def test_textual_inversion_artifact_is_the_average_of_the_trained_rows(tiny_model, concept_dir, tmp_path):
    """The saved embedding equals the recursion computed from the rows after every optimizer step;
    the rows that do not train keep bit-identical averages; raw/ holds the last trained rows."""
    c = load_components(tiny_model)
    method = TextualInversionMethod(TextualInversionConfig(init_token="cat", num_vectors=2), "<ti>")
    history, start, at_save = [], {}, {}
    after_step, save = method.after_step, method.save

    def record(components):
        after_step(components)
        history.append(method._weight(components, "text_encoder").detach().clone())

    def capture(components, out_dir, recipe):
        at_save[out_dir.name] = method._weight(components, "text_encoder").detach().clone()
        save(components, out_dir, recipe)

    method.after_step, method.save = record, capture
    examples = instance_examples(concept_dir, "<ti>", "a photo of {token}")
    prepare = method.prepare

    def keep_start(components):
        prepare(components)
        start["w"] = method._weight(components, "text_encoder").detach().clone()

    method.prepare = keep_start
    cfg = TrainConfig(steps=12, lr=5e-2, cache_text=False, ema_decay=0.8, save_ema="both")
    train(c, method, examples, cfg, tmp_path, resolution=16, progress=False)
    ids = method.ids
    expected = _by_hand(start["w"][ids], [w[ids] for w in history], 0.8)
    saved, raw = load_file(str(tmp_path / EMBEDS))["<ti>"], load_file(str(tmp_path / "raw" / EMBEDS))["<ti>"]
    assert torch.allclose(saved.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(raw, history[-1][ids]) and not torch.allclose(saved, raw, atol=1e-4)
    keep = torch.ones(start["w"].shape[0], dtype=torch.bool)
    keep[ids] = False
    assert torch.equal(at_save[tmp_path.name][keep], start["w"][keep])  # the frozen rows, averaged: bit-identical
    assert torch.equal(method._weight(c, "text_encoder").detach(), history[-1])  # the trained weights are back


def test_resume_with_ema_equals_an_uninterrupted_run(tiny_model, concept_dir, tmp_path):
    """Run 6 steps with a checkpoint at 3; a run resumed from it saves the same averaged and raw
    LoRA files, bit for bit (the shadow is in the checkpoint)."""
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    cfg = dict(steps=6, batch_size=2, lr=1e-2, checkpoint_every=3, ema_decay=0.9, save_ema="both")
    recipe = {"train": {"ema_decay": 0.9}}
    full = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg), tmp_path / "a",
                 resolution=16, recipe=recipe, progress=False)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000003"
    assert (ckpt / "ema.safetensors").is_file()
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    # Where the average is kept may change on resume (it is in the recipe, and not checked).
    resumed = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples,
                    TrainConfig(**cfg, resume="latest", ema_on_cpu=True), tmp_path / "b", resolution=16,
                    recipe={"train": {**recipe["train"], "ema_on_cpu": True}}, progress=False)
    assert resumed["losses"] == full["losses"]
    for name in (LORA, f"raw/{LORA}"):
        a, b = load_file(str(tmp_path / "a" / name)), load_file(str(tmp_path / "b" / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    ema, raw = load_file(str(tmp_path / "a" / LORA)), load_file(str(tmp_path / "a" / "raw" / LORA))
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    # A checkpoint without a moving average cannot continue one.
    plain = {k: v for k, v in cfg.items() if k not in ("ema_decay", "save_ema")}
    train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**plain), tmp_path / "c",
          resolution=16, progress=False)
    with pytest.raises(AdaptError, match="no moving average"):
        train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
              tmp_path / "c", resolution=16, progress=False)


def test_full_fine_tune_saves_the_averaged_unet_and_the_raw_pipeline(tiny_model, concept_dir, tmp_path):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    train(load_components(tiny_model), FullMethod(), examples,
          TrainConfig(steps=3, lr=1e-3, ema_decay=0.99, save_ema="both"), tmp_path, resolution=16, progress=False)
    unet = "unet/diffusion_pytorch_model.safetensors"
    ema, raw, base = (load_file(str(folder / unet)) for folder in (tmp_path, tmp_path / "raw", tiny_model))
    changed = [k for k in base if not torch.equal(raw[k], base[k])]
    assert changed and all(not torch.equal(ema[k], raw[k]) for k in changed)
    assert all(torch.equal(ema[k], base[k]) for k in base if k not in changed)  # what did not train: bit-identical
    assert (tmp_path / "raw" / "model_index.json").is_file() and (tmp_path / "model_index.json").is_file()


def test_cli_writes_both_loras_and_argument_errors_are_one_line(tiny_model, concept_dir, tmp_path):
    out = tmp_path / "cat"
    common = ["lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--steps", "2"]
    code, log = run(*common, "--output", out, "--ema-decay", "0.9", "--save-ema", "both")
    assert code == 0, log
    assert {p.name for p in out.glob("*.safetensors")} == {LORA, "cat.safetensors"}
    assert {p.name for p in (out / "raw").glob("*.safetensors")} == {LORA, "cat-raw.safetensors"}
    assert json.loads((out / "recipe.json").read_text())["train"]["ema_decay"] == 0.9
    for bad, message in ((["--ema-decay", "1"], "--ema-decay must be in [0, 1)"),
                         (["--ema-decay", "-0.1"], "--ema-decay must be in [0, 1)"),
                         (["--save-ema", "both"], "--save-ema both needs --ema-decay"),
                         (["--ema-on-cpu"], "--ema-on-cpu needs --ema-decay"),
                         (["--ema-decay", "0.9", "--save-ema", "raw"], "unknown --save-ema value 'raw'")):
        code, log = run(*common, "--output", tmp_path / "bad", *bad)
        assert code != 0 and message in log and "Traceback" not in log, log
        assert len(log.strip().splitlines()) == 1, log
