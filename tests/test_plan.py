"""plan.py without typer: flags + recipe + the model's adapt.json + the method's defaults -> a Plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from adapt.errors import AdaptError
from adapt.plan import make_plan


@pytest.fixture()
def model_with_defaults(tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "adapt.json").write_text(json.dumps({"textual-inversion": {"lr": 0.01, "steps": 7},
                                                   "dreambooth": {"lr": 1e-5}}))
    return str(folder)


def opts(tmp_path, **kw):
    images = tmp_path / "images"  # make_plan reads the folder: a missing or empty one is an error before torch loads
    if not images.is_dir():
        images.mkdir()
        Image.new("RGB", (16, 16)).save(images / "a.png")
    return {"images": images, "token": "<t>", "output": tmp_path / "run", **kw}


def test_precedence_flag_over_recipe_over_model_over_method_default(model_with_defaults, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nsteps = 9\n")
    ti = dict(init_token="cat", model=model_with_defaults)
    assert make_plan("textual-inversion", opts(tmp_path, **ti)).configs["train"].lr == 0.01  # model over method
    plan = make_plan("textual-inversion", opts(tmp_path, recipe=recipe, **ti))
    assert plan.configs["train"].steps == 9 and plan.configs["train"].lr == 0.01  # recipe over model
    assert make_plan("textual-inversion", opts(tmp_path, recipe=recipe, steps=3, **ti)).configs["train"].steps == 3
    assert make_plan("textual-inversion", opts(tmp_path, init_token="cat")).configs["train"].lr != 0.01


def test_each_setting_knows_where_it_came_from(model_with_defaults, tmp_path):
    """--dry-run and every run print the resolved settings with their source (issue 18 item 2)."""
    from adapt.recipe import describe

    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nsteps = 9\n[textual_inversion]\nnum_vectors = 2\n")
    plan = make_plan("textual-inversion", opts(tmp_path, recipe=recipe, init_token="cat", seed=4, model=model_with_defaults))
    train, ti = plan.sources["train"], plan.sources["textual_inversion"]
    assert (train["seed"], train["steps"], train["lr"], train["batch_size"]) == ("flag", "recipe", "model", "default")
    assert (ti["num_vectors"], ti["init_token"]) == ("recipe", "flag")
    dreambooth = make_plan("dreambooth", opts(tmp_path, model=tiny_model_of(model_with_defaults)))
    assert dreambooth.sources["train"]["lr"] == "method"  # the method's own default (5e-6), not the model's
    lines = describe(plan.configs, plan.sources, everything=False)
    assert "  [train] steps = 9  <- recipe" in lines and "  [train] lr = 0.01  <- model (adapt.json)" in lines
    assert "  [train] seed = 4  <- flag" in lines and not any("batch_size" in x for x in lines)
    assert any("batch_size = 1  <- default" in x for x in describe(plan.configs, plan.sources))


def test_the_model_may_suggest_any_sections_option(tiny_model, tmp_path):
    """adapt.json's options reach every section by name (the bundled base's DreamBooth prior-loss weight), below
    the recipe and the flags. The DreamBooth --lora variant takes its own section, "dreambooth-lora", not the full
    UNet's: a LoRA learns at other rates."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    (folder / "adapt.json").write_text(json.dumps({"dreambooth": {"lr": 2e-4, "prior_loss_weight": 0.3, "rank": 2}}))
    plan = make_plan("dreambooth", opts(tmp_path, model=str(folder)))
    assert plan.configs["dreambooth"].prior_loss_weight == 0.3 and plan.configs["train"].lr == 2e-4
    assert plan.sources["dreambooth"]["prior_loss_weight"] == "model"
    assert make_plan("dreambooth", opts(tmp_path, model=str(folder), prior_loss_weight=0.5)).configs["dreambooth"].prior_loss_weight == 0.5
    recipe = tmp_path / "r.toml"
    recipe.write_text("[dreambooth]\nprior_loss_weight = 0.7\n")
    assert make_plan("dreambooth", opts(tmp_path, model=str(folder), recipe=recipe)).configs["dreambooth"].prior_loss_weight == 0.7
    lora = make_plan("dreambooth", opts(tmp_path, model=str(folder), lora=True))
    assert lora.configs["dreambooth"].prior_loss_weight == 1.0 and lora.configs["lora"].rank != 2
    assert lora.configs["train"].lr == 1e-4 and lora.sources["train"]["lr"] == "default"
    (folder / "adapt.json").write_text(json.dumps({"dreambooth": {"lr": 2e-4, "rank": 2},
                                                   "dreambooth-lora": {"lr": 3e-3, "steps": 40, "prior_loss_weight": 0.5, "rank": 8}}))
    lora = make_plan("dreambooth", opts(tmp_path, model=str(folder), lora=True))
    assert (lora.configs["train"].lr, lora.configs["train"].steps) == (3e-3, 40) and lora.sources["train"]["lr"] == "model"
    assert lora.configs["dreambooth"].prior_loss_weight == 0.5 and lora.configs["lora"].rank == 8
    assert make_plan("dreambooth", opts(tmp_path, model=str(folder), lora=True, lr=1e-3)).configs["train"].lr == 1e-3
    full = make_plan("dreambooth", opts(tmp_path, model=str(folder)))
    assert full.configs["train"].lr == 2e-4 and full.configs["dreambooth"].prior_loss_weight == 1.0


def tiny_model_of(folder):
    """The same weights without adapt.json."""
    (Path(folder) / "adapt.json").unlink()
    return folder


def test_method_defaults_and_variants(tiny_model, tmp_path):
    full = make_plan("dreambooth", opts(tmp_path, model=tiny_model))
    assert full.configs["train"].lr == 5e-6 and full.spec.target.endswith(":FullMethod")
    lora = make_plan("dreambooth", opts(tmp_path, model=tiny_model, lora=True, rank=8))
    assert lora.configs["train"].lr == 1e-4 and lora.spec.target.endswith(":LoraMethod")
    assert lora.configs["lora"].rank == 8 and lora.command == "dreambooth"
    assert make_plan("lora", opts(tmp_path, model=tiny_model)).configs["train"].lr == 1e-4


def test_templates_scale_lr_and_output(tiny_model, tmp_path):
    plan = make_plan("textual-inversion", opts(tmp_path, model=tiny_model, init_token="cat", scale_lr=True, batch_size=2))
    assert isinstance(plan.template, list) and plan.configs["train"].lr == pytest.approx(0.01)
    given = make_plan("textual-inversion", opts(tmp_path, model=tiny_model, init_token="cat", prompt="x {token}"))
    assert given.template == "x {token}"
    assert make_plan("lora", opts(tmp_path, model=tiny_model)).output == tmp_path / "run"
    assert make_plan("lora", opts(tmp_path, model=tiny_model, output=None)).output.name.startswith("lora-")


@pytest.mark.parametrize("command,extra,message", [
    ("textual-inversion", {}, "--init-token"),
    ("lora", {"token": None}, "no token"),
    ("dreambooth", {"class_scheduler": "nope"}, "nope"),
    ("lora", {"resume": "latest", "output": None}, "--resume needs --output"),
])
def test_errors_before_anything_heavy(tiny_model, tmp_path, command, extra, message):
    with pytest.raises(AdaptError, match=message):
        make_plan(command, {**opts(tmp_path, model=tiny_model), **extra})
