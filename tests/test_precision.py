"""--mixed-precision auto (precision.py) and the layout / compile / AdamW-kernel options: what each
picks, that the run says so, and that the options train the same weights (compile: the same
within float tolerance)."""

from __future__ import annotations

import logging

import pytest
import torch

from adapt import precision
from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.optim import adamw_kernel, make_optimizer
from adapt.train import train
from adapt.train_config import TrainConfig

SD15_PARAMS = 859_520_964
CPUINFO = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


@pytest.mark.parametrize("device, params, capability, flags, picked", [
    ("cuda", SD15_PARAMS, (8, 0), None, "bf16"),     # A100
    ("cuda", SD15_PARAMS, (9, 0), None, "bf16"),     # H100
    ("cuda", SD15_PARAMS, (7, 5), None, "fp16"),     # T4: fp16 with fp32 master weights
    ("cuda", 1_000_000, (6, 1), None, "fp16"),
    ("cpu", SD15_PARAMS, None, ["amx_bf16", "avx512_bf16"], "bf16"),
    ("cpu", SD15_PARAMS, None, ["avx512_bf16"], "bf16"),
    ("cpu", 21_000_000, None, ["amx_bf16"], "no"),   # a small UNet: fp32 is faster on CPU
    ("cpu", SD15_PARAMS, None, [], "no"),            # no native bf16
    ("mps", SD15_PARAMS, None, None, "no"),
])
def test_auto_picks_by_device(device, params, capability, flags, picked):
    got, why = precision.choose("auto", device, params, cuda_capability=capability, gpu_name="GPU", cpu_flags=flags)
    assert got == picked
    assert why.startswith("auto: ") and len(why) > 20


@pytest.mark.parametrize("asked", ["no", "fp16", "bf16"])
def test_an_explicit_precision_is_kept(asked):
    assert precision.choose(asked, "cpu", SD15_PARAMS, cpu_flags=["amx_bf16"])[0] == asked
    assert precision.choose(asked, "cuda", SD15_PARAMS, cuda_capability=(9, 0))[0] == asked


def test_cpu_flags_are_read_from_cpuinfo():
    assert precision.cpu_bf16_flags(CPUINFO) == ["amx_bf16", "avx512_bf16"]
    assert precision.cpu_bf16_flags("flags\t: fpu avx2 avx512f\n") == []
    assert precision.cpu_bf16_flags("flags : avx512_bf16x\n") == []  # whole flags only


def test_auto_is_the_default_and_a_run_says_what_it_chose(tiny_model, concept_dir, tmp_path, monkeypatch, caplog):
    assert TrainConfig().mixed_precision == "auto"
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    # this UNet counts as SD-sized and the CPU as bf16-capable: auto must then train in bf16
    monkeypatch.setattr(precision, "CPU_BF16_MIN_PARAMS", 0)
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ["amx_bf16"])
    c = load_components(tiny_model)
    with caplog.at_level(logging.INFO, logger="adapt"):
        train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=2), tmp_path / "a", resolution=16, progress=False)
    assert "precision: bf16 (auto: this CPU runs bf16 natively (amx_bf16))" in caplog.text
    frozen = [p.dtype for n, p in c.unet.named_parameters() if "lora_" not in n]
    assert set(frozen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for n, p in c.unet.named_parameters() if "lora_" in n)
    # without native bf16, auto trains in fp32
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: [])
    c = load_components(tiny_model)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="adapt"):
        train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=2), tmp_path / "b", resolution=16, progress=False)
    assert "precision: fp32 (auto: this CPU has no native bf16" in caplog.text
    assert {p.dtype for p in c.unet.parameters()} == {torch.float32}


def _lora_after(tiny_model, examples, tmp_path, **options) -> dict:
    c = load_components(tiny_model)
    train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=3, mixed_precision="no", **options),
          tmp_path / "_".join(map(str, options.values())), resolution=16, progress=False)
    layout = torch.channels_last if options.get("channels_last") else torch.contiguous_format
    assert c.unet.conv_in.weight.is_contiguous(memory_format=layout)
    return {n: p.detach().clone() for n, p in c.unet.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("kernel, flags", [("auto", {"foreach": None, "fused": True}), ("for", {"foreach": False}),
                                           ("foreach", {"foreach": True}), ("fused", {"fused": True})])
def test_adamw_kernel_reaches_the_optimizer(kernel, flags):
    opt = make_optimizer(TrainConfig(adamw_kernel=kernel), [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1e-3}])
    assert {k: opt.defaults[k] for k in flags} == flags


def test_auto_kernel_is_fused_only_where_torch_has_it():
    """auto = fused for weights on CPU/CUDA; on another device (here "meta"), or with fp16, torch's own default."""
    cpu, meta = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2, device="meta"))
    assert adamw_kernel(TrainConfig(), [{"params": [cpu]}]) == "fused"
    assert adamw_kernel(TrainConfig(), [{"params": [cpu]}, {"params": [meta]}]) == "torch"
    assert adamw_kernel(TrainConfig(adamw_kernel="for"), [{"params": [cpu]}]) == "for"
    # fp16's GradScaler skips fused steps inside the kernel, where accelerate cannot see it (accelerate#4242)
    assert adamw_kernel(TrainConfig(mixed_precision="fp16"), [{"params": [cpu]}]) == "torch"


def test_layout_and_adamw_kernels_train_the_same_weights(tiny_model, concept_dir, tmp_path):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    plain = _lora_after(tiny_model, examples, tmp_path, adamw_kernel="for")
    for options in ({"adamw_kernel": "foreach"}, {"adamw_kernel": "fused"}, {"channels_last": True}):
        other = _lora_after(tiny_model, examples, tmp_path, **options)
        assert other.keys() == plain.keys()
        moved = max((plain[k] - other[k]).abs().max().item() for k in plain)
        assert moved < 1e-5, (options, moved)
    with pytest.raises(AdaptError, match="unknown AdamW kernel 'fast'"):
        TrainConfig(adamw_kernel="fast")


def test_compile_compiles_the_unet_in_place(tiny_model):
    """--compile compiles the UNet module itself (its parameter names, checkpoints and saving stay as they are);
    compiling takes minutes on CPU, so the training it gives is measured in benchmarks/compare.py, not here."""
    from adapt.run import trainable_parameters

    c = load_components(tiny_model)
    trainable_parameters(c, LoraMethod(LoraConfig()), TrainConfig(compile=True, mixed_precision="no"), torch.device("cpu"))
    assert c.unet._compiled_call_impl is not None
    assert not any("_orig_mod" in n for n, _ in c.unet.named_parameters())


class _Accel:  # what precision.autocast reads of an Accelerator made by run.make_accelerator
    def autocast(self):
        return torch.autocast("cpu", torch.bfloat16, cache_enabled=False)


def _conv_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 8, 3, padding=1),
                               torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_recast_weights_give_the_same_gradients_and_read_the_weight_in_backward(checkpointing):
    """Under bf16 autocast with recast, backward casts the fp32 weight again: gradients are bit-identical to
    autocast's own, and a weight changed in place after forward is refused, not silently used (so backward
    reads the weight, not a copy kept from forward). With gradient checkpointing too."""
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
    grads = {}
    for recast in (False, True):
        net = _conv_net()
        with precision.autocast(_Accel(), recast):
            y = torch.utils.checkpoint.checkpoint(net, x, use_reentrant=False) if checkpointing else net(x)
        y.float().square().sum().backward()
        grads[recast] = [p.grad for p in net.parameters()]
        assert y.dtype == torch.bfloat16
    assert all(torch.equal(a, b) for a, b in zip(grads[False], grads[True]))
    net = _conv_net()
    with precision.autocast(_Accel(), True):
        y = net(x)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="changed between forward and backward"):
        y.float().sum().backward()


def test_recast_keeps_no_cast_copy_alive_after_forward():
    """The low-precision copy of a trainable weight dies with forward (only a note of it is saved);
    without recast, autograd keeps it for backward as usual."""
    import weakref

    w = torch.randn(8, 8, requires_grad=True)
    frozen = torch.randn(8, 8).to(torch.bfloat16)
    x = torch.randn(2, 8, dtype=torch.bfloat16, requires_grad=True)
    for recast, alive in ((True, False), (False, True)):
        with precision.autocast(_Accel(), recast):
            copy = w.to(torch.bfloat16)
            y = (x @ copy) @ frozen
        ref = weakref.ref(copy)
        del copy
        assert (ref() is not None) == alive, recast
        y.float().sum().backward()
        assert w.grad is not None
        w.grad = None


def test_the_runs_accelerator_keeps_no_cast_copy_through_the_prepared_unets_forward(tiny_model, tmp_path, monkeypatch):
    """accelerate wraps a prepared model's forward in an autocast of its own; unless the Accelerator is made
    without the cast cache (run.make_accelerator, run.autocast_kwargs), that cache would hold every cast copy
    until forward ends. Here each copy the hooks replace is already gone when the UNet's forward returns."""
    import weakref

    from adapt.run import make_accelerator

    copies = []
    pack = precision._pack

    def noting(t):
        saved = pack(t)
        if saved is not t:  # a note in place of a cast copy
            copies.append(weakref.ref(t))
        return saved
    monkeypatch.setattr(precision, "_pack", noting)
    for cfg, cached in ((TrainConfig(mixed_precision="bf16"), False), (TrainConfig(mixed_precision="bf16", recast_weights=False), True)):
        acc = make_accelerator(cfg, tmp_path)
        assert precision.recasts(cfg) is not cached
        unet = acc.prepare(load_components(tiny_model).unet.requires_grad_(True))
        copies.clear()
        with precision.autocast(acc, True):
            out = unet(torch.randn(1, 4, 8, 8), 10, torch.randn(1, 77, 32)).sample
            alive = sum(r() is not None for r in copies)
        assert copies and (alive > 0) == cached, (cfg.recast_weights, alive, len(copies))
        out.float().sum().backward()
    assert not precision.recasts(TrainConfig(mixed_precision="no")) and not precision.recasts(TrainConfig(compile=True))


def test_recast_weights_train_a_full_fine_tune_bit_identically(tiny_model, concept_dir, tmp_path):
    from adapt.methods.full import FullMethod

    examples = instance_examples(concept_dir, "<sks>", "a photo of {token} dog")
    after = {}
    for recast in (True, False):
        c = load_components(tiny_model)
        train(c, FullMethod(), examples, TrainConfig(steps=2, lr=1e-3, mixed_precision="bf16", recast_weights=recast),
              tmp_path / str(recast), resolution=16, progress=False)
        after[recast] = dict(c.unet.named_parameters())
    start = dict(load_components(tiny_model).unet.named_parameters())
    assert any(not torch.equal(start[k], v) for k, v in after[True].items())
    assert all(torch.equal(after[True][k], after[False][k]) for k in start)
