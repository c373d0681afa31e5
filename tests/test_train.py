"""The one training loop: the loss formula, caching, precision handling, optimizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from adapt.config import LoraConfig
from adapt.data import Example, instance_examples, loss_weights
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.run import place_for_training
from adapt.train import diffusion_loss, train
from adapt.train_config import TrainConfig


@pytest.mark.parametrize("model", ["tiny_model", "tiny_v_model"])
def test_loss_equals_hand_computation(model, request):
    """Epsilon and v targets, and the per-sample weights of a mixed instance/class batch:
    loss = mean(instance MSE) + lambda * mean(class MSE)."""
    c = load_components(request.getfixturevalue(model))
    torch.manual_seed(0)
    latents = torch.randn(4, 4, 8, 8)
    noise = torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([3, 250, 600, 999])
    hidden = torch.randn(4, 77, 32)
    lam = 0.7
    batch = [Example(Path("a"), "p", 1.0, 0), Example(Path("b"), "p", 1.0, 0),
             Example(Path("c"), "q", lam, 1), Example(Path("d"), "q", lam, 1)]
    with torch.no_grad():
        loss = diffusion_loss(c.unet, c.noise_scheduler, latents, hidden, loss_weights(batch), noise, timesteps)

        ab = c.noise_scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * latents + (1 - ab).sqrt() * noise
        v = c.noise_scheduler.config.prediction_type == "v_prediction"
        target = ab.sqrt() * noise - (1 - ab).sqrt() * latents if v else noise
        pred = c.unet(noisy, timesteps, hidden).sample
        per = ((pred - target) ** 2).mean(dim=(1, 2, 3))
        expected = per[:2].mean() + lam * per[2:].mean()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-7)
    # Plain batches are a plain mean.
    assert torch.allclose(loss_weights(batch[:2]), torch.tensor([0.5, 0.5]))


def _base_state(module) -> dict[str, torch.Tensor]:
    """Base weights of a (possibly peft-wrapped) module, under their original names."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items() if "lora_" not in k}


def test_lora_changes_only_adapters_and_saves_only_q_k(tiny_model, concept_dir, tmp_path):
    c = load_components(tiny_model)
    before = {n: _base_state(getattr(c, n)) for n in ("unet", "text_encoder", "vae")}
    # No caching, so the VAE and text encoder stay in memory and can be compared too.
    cfg = TrainConfig(steps=4, lr=1e-2, cache_latents=False, cache_text=False)
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    train(c, LoraMethod(LoraConfig(rank=4)), examples, cfg, tmp_path, resolution=16, recipe={"x": 1}, progress=False)
    for name, state in before.items():
        after = _base_state(getattr(c, name))
        assert after.keys() == state.keys()
        for k in state:
            assert torch.equal(after[k], state[k]), f"{name}.{k} changed"
    # The adapters did train.
    lora_b = [p for n, p in c.unet.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    n_qk = sum(1 for n, _ in c.unet.named_modules() if n.endswith((".to_q", ".to_k")))
    assert len(keys) == 2 * n_qk
    assert all(k.startswith("unet.") and (".to_q.lora." in k or ".to_k.lora." in k) for k in keys)
    assert json.loads(meta["adapt.recipe"]) == {"x": 1}
    assert json.loads(meta["lora_adapter_metadata"])["unet.r"] == 4
    # The base model on disk is untouched (training never writes there).
    assert sorted(p.name for p in (tiny_model / "unet").iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_caches_give_the_same_training_as_no_cache(tiny_model, concept_dir, tmp_path):
    """Caching only memoises the VAE encoder output and the frozen text encoder output: the losses
    are those of the uncached loop, while the VAE runs once per (image, flip)."""
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    runs = {}
    for cached in (True, False):
        c = load_components(tiny_model)
        calls = []
        encode = c.vae.encode
        c.vae.encode = lambda x, *a, **k: (calls.append(x.shape[0]), encode(x, *a, **k))[1]
        cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, cache_latents=cached, cache_text=cached)
        r = train(c, LoraMethod(LoraConfig()), examples, cfg, tmp_path / str(cached), resolution=16,
                  random_flip=True, progress=False)
        runs[cached] = (r["losses"], sum(calls), c)
    assert runs[True][1] == 2 * len(examples)  # once per image and flip variant
    assert runs[False][1] == 6 * 2  # every step re-encodes its batch
    assert runs[True][2].vae is None and runs[True][2].text_encoder is None  # released after caching
    assert runs[False][2].vae is not None
    assert torch.allclose(torch.tensor(runs[True][0]), torch.tensor(runs[False][0]), rtol=1e-4)


def test_text_cache_encodes_each_distinct_prompt_once(tiny_model, concept_dir, tmp_path):
    c = load_components(tiny_model)
    seen = []
    forward = c.text_encoder.forward
    c.text_encoder.forward = lambda ids, *a, **k: (seen.append(ids.shape[0]), forward(ids, *a, **k))[1]
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    examples[0] = Example(examples[0].image, "another prompt")
    train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=5), tmp_path, resolution=16, progress=False)
    assert sum(seen) == 2


def test_mixed_precision_keeps_trainable_weights_fp32(tiny_model):
    c = load_components(tiny_model)
    method = LoraMethod(LoraConfig())
    method.prepare(c)
    params = method.trainable_parameters(c)
    place_for_training(c, {id(p) for p in params}, torch.device("cpu"), torch.float16)
    for n, p in c.unet.named_parameters():
        assert p.dtype == (torch.float32 if "lora_" in n else torch.float16), n
    assert all(p.dtype == torch.float16 for p in c.text_encoder.parameters())
    assert all(p.dtype == torch.float32 for p in c.vae.parameters())


def test_bf16_run_and_fp16_on_cpu_is_a_clear_error(tiny_model, concept_dir, tmp_path):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    c = load_components(tiny_model)
    r = train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=3, mixed_precision="bf16"), tmp_path / "bf16",
              resolution=16, progress=False)
    assert len(r["losses"]) == 3 and all(map(lambda x: x == x, r["losses"]))
    assert all(p.dtype == torch.float32 for n, p in c.unet.named_parameters() if "lora_" in n)
    with pytest.raises(AdaptError, match="fp16 mixed precision needs a GPU"):
        train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(steps=1, mixed_precision="fp16"),
              tmp_path / "fp16", resolution=16, progress=False)


def test_accumulation_checkpointing_schedule_and_8bit(tiny_model, concept_dir, tmp_path):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    cfg = TrainConfig(steps=4, grad_accum=2, gradient_checkpointing=True, lr_scheduler="cosine", warmup_steps=1,
                      optimizer="adamw8bit", lr=1e-3)
    train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, cfg, tmp_path, resolution=16, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    lrs = [r["lr"] for r in rows]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] < lrs[1]  # warm-up, then cosine decay
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_overfitting_one_image_drives_the_loss_down(tiny_model, concept_dir, tmp_path):
    """A few hundred LoRA steps on one image: the loss on a fixed set of (noise, timestep) pairs
    falls well below where it started."""
    c = load_components(tiny_model)
    example = instance_examples(concept_dir, "<sks>", "a photo of {token}")[:1]
    from adapt.data import load_pixels
    from adapt.encode import tokenize

    with torch.no_grad():
        latents = c.vae.encode(load_pixels(example[0], 16)[None]).latent_dist.mean * c.vae.config.scaling_factor
        hidden = c.text_encoder(tokenize(c, example[0].prompt))[0]
    g = torch.Generator().manual_seed(123)
    n = 64
    noise = torch.randn(n, *latents.shape[1:], generator=g)
    timesteps = torch.linspace(0, 999, n).long()
    unet, sched = c.unet, c.noise_scheduler

    def fixed_loss():
        with torch.no_grad():
            return diffusion_loss(unet, sched, latents.expand(n, -1, -1, -1), hidden.expand(n, -1, -1),
                                  torch.full((n,), 1.0 / n), noise, timesteps).item()

    start = fixed_loss()
    cfg = TrainConfig(steps=300, lr=5e-3, batch_size=4)
    train(c, LoraMethod(LoraConfig(rank=8, targets="q,k,v,out")), example, cfg, tmp_path, resolution=16, progress=False)
    end = fixed_loss()
    assert end < 0.5 * start, (start, end)


def test_resume_from_checkpoint_continues_exactly(tiny_model, concept_dir, tmp_path):
    """Steps after a checkpoint, and the final weights, equal those of an uninterrupted run."""
    from safetensors.torch import load_file

    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    cfg = dict(steps=6, batch_size=2, lr=1e-2, checkpoint_every=3, caption_dropout=0.3)
    full = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg), tmp_path / "a",
                 resolution=16, random_flip=True, recipe={"r": 1}, progress=False)
    ckpt = tmp_path / "a" / "checkpoints" / "step-000003"
    assert ckpt.is_dir()
    import shutil

    shutil.copytree(ckpt, tmp_path / "b" / "checkpoints" / ckpt.name)
    resumed = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
                    tmp_path / "b", resolution=16, random_flip=True, recipe={"r": 1}, progress=False)
    assert resumed["losses"] == full["losses"]
    a = load_file(str(tmp_path / "a" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AdaptError, match="another recipe"):
        train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
              tmp_path / "b", resolution=16, random_flip=True, recipe={"r": 2}, progress=False)


def test_components_come_back_frozen_in_eval_mode_with_the_asked_dtype(tiny_model):
    c = load_components(tiny_model, dtype=torch.bfloat16)
    for m in (c.unet, c.vae, c.text_encoder):
        assert not m.training and not any(p.requires_grad for p in m.parameters())
        assert {p.dtype for p in m.parameters()} == {torch.bfloat16} and {p.device.type for p in m.parameters()} == {"cpu"}


def test_8bit_optimizer_that_cannot_load_is_a_clear_error(tiny_model, concept_dir, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without a working build
    with pytest.raises(AdaptError, match="--optimizer adamw8bit needs a working bitsandbytes.*--optimizer adamw"):
        train(load_components(tiny_model), LoraMethod(LoraConfig()), instance_examples(concept_dir, "<sks>", "x"),
              TrainConfig(steps=1, optimizer="adamw8bit"), tmp_path, resolution=16, progress=False)


def test_two_accumulated_micro_batches_equal_one_batch_of_two(tiny_model, concept_dir, tmp_path):
    """batch 1 x grad_accum 2 draws the same samples, flips, latent samples, noise and timesteps as
    batch 2 x grad_accum 1 (the data draws of a batch are per sample, in order), so the per-step
    losses agree to float rounding and the LoRA weights nearly so. Caption dropout is left out:
    with --random-flip AND --caption-dropout a batch draws all its flips, then all its dropouts, so
    the two layouts consume the data generator in different orders (a real, documented difference).
    Weight bound: the summation order differs (one backward of 2 vs two of 1), and Adam divides by
    sqrt(v) so it amplifies that float noise; over 6 steps we measured a per-tensor relative
    difference of 1.8e-5 (CPU, float32) and allow about 5x that."""
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    runs = []
    for batch_size, grad_accum in ((1, 2), (2, 1)):
        c = load_components(tiny_model)
        cfg = TrainConfig(steps=6, batch_size=batch_size, grad_accum=grad_accum, lr=1e-3)
        r = train(c, LoraMethod(LoraConfig(rank=4)), examples, cfg, tmp_path / f"{batch_size}x{grad_accum}",
                  resolution=16, random_flip=True, progress=False)
        runs.append((r["losses"], {n: p.detach().clone() for n, p in c.unet.named_parameters() if "lora_" in n}))
    (losses_a, weights_a), (losses_b, weights_b) = runs
    assert len(losses_a) == len(losses_b) == 6
    assert losses_a == pytest.approx(losses_b, rel=1e-5, abs=1e-5)
    assert weights_a.keys() == weights_b.keys()
    for name, b in weights_b.items():
        assert (weights_a[name] - b).norm() <= 1e-4 * b.norm() + 1e-8, name
