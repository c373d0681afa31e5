"""Optimizers and per-parameter-group learning rates: --text-encoder-lr, --embedding-lr and
--loraplus-ratio each move their own weights by their own lr through the real loop; the LR schedule
keeps the groups' ratios; --optimizer prodigy / schedule-free-adamw train, resume exactly and name
their package when it is missing.

How the step sizes are measured: one AdamW step from a fresh state with weight decay 0 moves every
element by lr * g / (|g| + eps), i.e. by lr wherever the gradient is not tiny. So the median |change|
of a group's moved elements is its lr."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from adapt.config import LoraConfig, TextualInversionConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.methods.full import FullMethod
from adapt.methods.lora import LoraMethod
from adapt.methods.textual_inversion import TextualInversionMethod
from adapt.models import load_components
from adapt.plan import make_plan
from adapt.optim import param_groups
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

LORA = "pytorch_lora_weights.safetensors"


class NonzeroB(LoraMethod):
    """LoRA whose B matrices start random instead of zero: with B = 0 the A matrices get no gradient
    in a first step, and the test wants to see both move. Keeps every weight as training starts."""

    def prepare(self, components) -> None:
        super().prepare(components)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for module in self.trainable_modules:
                for name, p in getattr(components, module).named_parameters():
                    if ".lora_B." in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        self.before = snapshot(components)


def snapshot(c, modules=("unet", "text_encoder", "vae")) -> dict[str, torch.Tensor]:
    return {f"{m}.{n}": p.detach().clone() for m in modules for n, p in getattr(c, m).named_parameters()}


def step_sizes(before: dict, after: dict, group_of) -> dict[str, float]:
    """Median |change| of the moved elements, per group (`group_of(name)`; None: a frozen weight,
    which must be bit-identical)."""
    moved: dict[str, list] = {}
    for name, old in before.items():
        delta = (after[name] - old).abs().flatten()
        group = group_of(name)
        if group is None:
            assert torch.equal(after[name], old), f"frozen {name} changed"
        else:
            moved.setdefault(group, []).append(delta[delta > 0])
    return {g: torch.cat(ds).median().item() for g, ds in moved.items()}


def one_step(c, method, examples, tmp_path, **kw):
    cfg = TrainConfig(steps=1, weight_decay=0.0, cache_latents=False, cache_text=False, **kw)
    train(c, method, examples, cfg, tmp_path, resolution=16, progress=False)


@pytest.fixture
def examples(concept_dir):
    return instance_examples(concept_dir, "<sks>", "a photo of {token}")


def test_lora_plus_and_text_encoder_lr_move_each_group_by_its_own_lr(tiny_model, examples, tmp_path):
    c = load_components(tiny_model)
    method = NonzeroB(LoraConfig(train_text_encoder=True))
    one_step(c, method, examples, tmp_path, lr=1e-4, text_encoder_lr=3e-5, loraplus_ratio=8)

    def group_of(name):
        if "lora_" not in name:
            return None  # every base weight, and the VAE
        return ("unet" if name.startswith("unet.") else "text_encoder") + (".lora_B" if ".lora_B." in name else "")

    sizes = step_sizes(method.before, snapshot(c), group_of)
    print("measured step sizes:", sizes)
    expected = {"unet": 1e-4, "unet.lora_B": 8e-4, "text_encoder": 3e-5, "text_encoder.lora_B": 2.4e-4}
    assert sizes == pytest.approx(expected, rel=1e-3)


def test_full_fine_tuning_text_encoder_lr(tiny_model, examples, tmp_path):
    c = load_components(tiny_model)
    before = snapshot(c)
    one_step(c, FullMethod(train_text_encoder=True), examples, tmp_path, lr=2e-4, text_encoder_lr=5e-5)
    sizes = step_sizes(before, snapshot(c), lambda n: None if n.startswith("vae.") else n.split(".")[0])
    print("measured step sizes:", sizes)
    assert sizes == pytest.approx({"unet": 2e-4, "text_encoder": 5e-5}, rel=1e-3)


def test_textual_inversion_embedding_lr(tiny_model, concept_dir, tmp_path):
    c = load_components(tiny_model)
    method = TextualInversionMethod(TextualInversionConfig(init_token="cat"), "<ti>")
    frozen = snapshot(c, ("unet", "vae"))
    te_before = snapshot(c, ("text_encoder",))
    one_step(c, method, instance_examples(concept_dir, "<ti>", "a photo of {token}"), tmp_path, lr=1e-3, embedding_lr=2e-2)
    weight = c.text_encoder.get_input_embeddings().weight.detach()
    new, old = method.ids, method.rows["text_encoder"][1]  # the matrix as it started (new rows from "cat")
    delta = (weight[new] - old[new]).abs()
    print("measured step size: embedding", delta.median().item())
    assert delta.median().item() == pytest.approx(2e-2, rel=1e-3)
    keep = torch.ones(weight.shape[0], dtype=torch.bool)
    keep[new] = False
    assert torch.equal(weight[keep], old[keep])  # the other rows stay the base's
    step_sizes(frozen, snapshot(c, ("unet", "vae")), lambda n: None)  # UNet and VAE bit-identical
    after = {k: v for k, v in snapshot(c, ("text_encoder",)).items() if "token_embedding" not in k}
    assert all(torch.equal(v, te_before[k]) for k, v in after.items())


def _params(*sizes):
    return [torch.nn.Parameter(torch.zeros(n)) for n in sizes]


def test_groups_merge_by_lr_in_parameter_order_and_the_schedule_keeps_their_ratios():
    from diffusers.optimization import get_scheduler

    a, b, c = _params(2, 3, 4)
    # no per-group lrs: the one group runs always had, the parameters in their trainable order
    one = param_groups(TrainConfig(), {"unet": [a, c], "unet.lora_B": [b]}, [a, b, c])
    assert len(one) == 1 and one[0]["params"] == [a, b, c] and one[0]["lr"] == 1e-4
    groups = param_groups(TrainConfig(lr=1e-3, loraplus_ratio=4, text_encoder_lr=2e-4),
                          {"unet": [a], "unet.lora_B": [b], "text_encoder": [c]}, [a, b, c])
    assert [(g["params"], g["lr"]) for g in groups] == [([a], 1e-3), ([b], 4e-3), ([c], 2e-4)]
    with pytest.raises(AdaptError, match="each trainable parameter once"):
        param_groups(TrainConfig(), {"unet": [a]}, [a, b])
    # diffusers' schedules are LambdaLR: one factor for every group, times each group's own lr
    opt = torch.optim.AdamW(groups)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    factors = []
    for _ in range(6):
        opt.step()
        sched.step()
        factors.append(sched.get_last_lr()[0] / 1e-3)
        assert sched.get_last_lr() == pytest.approx([1e-3 * factors[-1], 4e-3 * factors[-1], 2e-4 * factors[-1]], rel=1e-9)
    assert factors[0] == 0.5 and factors[1] == 1 and 0 < factors[-1] < 0.7  # warm-up, then cosine decay


@pytest.mark.parametrize("kw,message", [
    ({"optimizer": "sgd"}, "unknown optimizer 'sgd'; choose one of: adamw, adamw8bit, prodigy, schedule-free-adamw"),
    ({"loraplus_ratio": 0}, "--loraplus-ratio must be > 0"),
    ({"text_encoder_lr": -1e-4}, "--text-encoder-lr must be > 0"),
    ({"optimizer": "prodigy", "loraplus_ratio": 16}, "prodigy estimates one step size"),
    ({"optimizer": "prodigy", "embedding_lr": 1e-3}, "drop --text-encoder-lr, --embedding-lr and --loraplus-ratio"),
    ({"optimizer": "schedule-free-adamw", "lr_scheduler": "cosine"}, "use --lr-scheduler constant instead of cosine"),
])
def test_option_mistakes_are_one_line_errors(kw, message):
    with pytest.raises(AdaptError, match=message):
        TrainConfig(**kw)


def test_group_lr():
    cfg = TrainConfig(lr=1e-4, embedding_lr=5e-3, loraplus_ratio=16)
    assert cfg.group_lr("unet") == 1e-4 and cfg.group_lr("text_encoder") == 1e-4 and cfg.group_lr("embedding") == 5e-3
    assert cfg.group_lr("text_encoder.lora_B") == pytest.approx(1.6e-3)
    with pytest.raises(ValueError, match="unknown parameter group"):
        cfg.group_lr("vae")


def _pretend(monkeypatch, module, installed: bool):
    """importlib.util.find_spec (what the plan's check asks) says `module` is there or not."""
    real = importlib.util.find_spec
    spec = object() if installed else None
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == module else real(name, *a))


@pytest.mark.parametrize("optimizer,package", [("prodigy", "prodigyopt"), ("schedule-free-adamw", "schedulefree")])
def test_missing_optimizer_package_is_a_clear_error(optimizer, package, tiny_model, concept_dir, examples, tmp_path,
                                                    monkeypatch):
    _pretend(monkeypatch, package, installed=False)
    code, out = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output",
                    tmp_path / "run", "--optimizer", optimizer)
    assert code == 2
    assert out.strip().splitlines()[-1] == (f"error: --optimizer {optimizer} needs the {package} package, which is not "
                                            f'installed: pip install {package} (or pip install "adapt[optimizers]")')
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training
    with pytest.raises(AdaptError, match=f"pip install {package}"):  # train() without a plan says it too
        train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(steps=1, optimizer=optimizer),
              tmp_path / "direct", resolution=16, progress=False)


def test_prodigy_takes_lr_1_unless_told(tiny_model, concept_dir, tmp_path, caplog, monkeypatch):
    _pretend(monkeypatch, "prodigyopt", installed=True)  # the plan checks it is installed; this test needs no more
    def lr(**kw):
        opts = {"images": concept_dir, "token": "<t>", "output": tmp_path / "run", "model": tiny_model, **kw}
        return make_plan("lora", opts).configs["train"].lr

    assert lr() == 1e-4 and lr(optimizer="prodigy") == 1.0 and lr(optimizer="prodigy", lr=0.5) == 0.5
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlr = 2.0\n")
    assert lr(optimizer="prodigy", recipe=recipe) == 2.0
    with caplog.at_level("WARNING", logger="adapt"):
        assert lr(optimizer="prodigy", lr=1e-4) == 1e-4
    assert "~10000x smaller" in caplog.text


def _spy_modes(monkeypatch, calls):
    import schedulefree

    for mode in ("train", "eval"):
        original = getattr(schedulefree.AdamWScheduleFree, mode)
        monkeypatch.setattr(schedulefree.AdamWScheduleFree, mode,
                            lambda self, _o=original, _m=mode: (calls.append(_m), _o(self))[1])


@pytest.mark.parametrize("optimizer,package,lr", [("prodigy", "prodigyopt", 1.0), ("schedule-free-adamw", "schedulefree", 1e-2)])
def test_optimizer_trains_and_resumes_exactly(optimizer, package, lr, tiny_model, examples, tmp_path, monkeypatch):
    """Losses finite, adapters moved; an interrupted run resumed from its step-3 checkpoint equals the
    uninterrupted one (losses and final weights; the optimizers' own state - Prodigy's d, schedule-free's
    z and average weights - is in the checkpoint). The uninterrupted run also validates at steps 2 and
    4: schedule-free switches to its average weights for that and back exactly, so it changes nothing.
    Schedule-free: the file saved is made from the average (eval) weights."""
    from safetensors.torch import load_file

    pytest.importorskip(package)
    calls: list[str] = []
    if optimizer == "schedule-free-adamw":
        _spy_modes(monkeypatch, calls)
    cfg = dict(steps=6, lr=lr, batch_size=2, checkpoint_every=3, optimizer=optimizer, warmup_steps=2)

    class Spy(LoraMethod):
        def save(self, *a, **k):
            calls.append("save")
            super().save(*a, **k)

    full = train(load_components(tiny_model), Spy(LoraConfig()), examples,
                 TrainConfig(**cfg, validation_prompt=["a photo of <sks>"], validation_every=2, validation_steps=2),
                 tmp_path / "a", resolution=16, progress=False)
    assert all(map(torch.isfinite, torch.tensor(full["losses"])))
    a = load_file(str(tmp_path / "a" / LORA))
    assert all(v.abs().sum() > 0 for k, v in a.items() if ".lora.up." in k)  # B (up) starts at zero: it moved
    if optimizer == "schedule-free-adamw":  # train; validation at 2 and 4: eval, back to train; final: eval, save
        assert calls == ["train", "eval", "train", "eval", "train", "eval", "save"]
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step-000003", tmp_path / "b" / "checkpoints" / "step-000003")
    resumed = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
                    tmp_path / "b", resolution=16, progress=False)
    assert resumed["losses"] == full["losses"]
    b = load_file(str(tmp_path / "b" / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # schedule-free warms up inside the optimizer; Prodigy's --lr (its step-size multiplier) warms up over 2 steps
    assert [r["lr"] for r in rows] == ([lr] * 6 if optimizer == "schedule-free-adamw" else [lr / 2] + [lr] * 5)


@pytest.mark.parametrize("scheduler", ["constant", "linear"])
def test_warmup_steps_warm_up_every_schedule_also_constant(tiny_model, concept_dir, tmp_path, scheduler):
    """diffusers' "constant" schedule drops num_warmup_steps: --warmup-steps used to do nothing under the default
    --lr-scheduler. Now the lr of the logged steps rises over the warm-up, then holds (constant) or decays (linear)."""
    cfg = TrainConfig(steps=6, lr=1e-3, lr_scheduler=scheduler, warmup_steps=3)
    train(load_components(tiny_model), LoraMethod(LoraConfig()), instance_examples(concept_dir, "<sks>", "a photo of {token}"),
          cfg, tmp_path, resolution=16, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lrs[:3] == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3])  # the lr after each step
    assert lrs[3:] == pytest.approx([1e-3] * 3) if scheduler == "constant" else lrs[3] < 1e-3
