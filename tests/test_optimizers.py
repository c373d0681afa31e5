"""Per-parameter-group learning rates: --text-encoder-lr, --embedding-lr and --loraplus-ratio each
move their own weights by their own lr through the real loop; the LR schedule keeps the groups'
ratios.

How the step sizes are measured: one AdamW step from a fresh state with weight decay 0 moves every
element by lr * g / (|g| + eps), i.e. by lr wherever the gradient is not tiny. So the median |change|
of a group's moved elements is its lr."""

from __future__ import annotations

import pytest
import torch

from adapt.config import LoraConfig, TextualInversionConfig, TrainConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.methods.full import FullMethod
from adapt.methods.lora import LoraMethod
from adapt.methods.textual_inversion import TextualInversionMethod
from adapt.models import load_components
from adapt.run import param_groups
from adapt.train import train


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
    ({"loraplus_ratio": 0}, "--loraplus-ratio must be > 0"),
    ({"text_encoder_lr": -1e-4}, "--text-encoder-lr must be > 0"),
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
