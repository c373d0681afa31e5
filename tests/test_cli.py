"""The command line: help and argument errors answer without importing torch; lora -> generate
-> eval run end to end on the tiny model; bad input is one line on stderr with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from adapt.recipe import build, read_recipe
from conftest import run

ROOT = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"


def _imports_after(argv: list[str]) -> tuple[int, bool]:
    code = ("import sys\nfrom adapt.cli import app\n"
            f"try:\n    app({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    return int(out[-1]), out[-2] == "TORCH"


@pytest.mark.parametrize("argv,code", [
    (["--help"], 0), (["lora", "--help"], 0), (["eval", "--help"], 0), (["schedulers"], 0),
    (["lora", "--images", "/nonexistent", "--token", "<sks>", "--lr-scheduler", "nope"], 2),
    (["lora", "--token", "two words", "--images", "x"], 2),
    (["generate", "x", "--scheduler", "nope"], 2),
    # said before torch loads (each loaded it first): a missing or empty image folder, nothing to resume, an empty --set
    (["lora", "--images", "/nonexistent", "--token", "<sks>"], 2),
    (["lora", "--images", "EMPTY", "--token", "<sks>"], 2),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--output", "EMPTY", "--resume", "latest"], 2),
    (["eval", "--prompt", "x", "--set", "EMPTY"], 2),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--validation-images", "EMPTY"], 2),
    (["merge", "--lora", "IMAGES/a.png", "--output", "x.safetensors", "--rank", "0"], 2),
])
def test_help_and_argument_errors_do_not_import_torch(argv, code, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((ROOT / "examples" / "cat" / "1f431.png").read_bytes())
    folders = {"EMPTY": str(tmp_path / "empty"), "IMAGES": str(tmp_path / "images")}
    assert _imports_after([folders.get(a, a).replace("IMAGES/", folders["IMAGES"] + "/") for a in argv]) == (code, False)


@pytest.mark.parametrize("argv,message", [
    (["lora", "--token", "<sks>", "--images", "/no/such/folder"], "does not exist"),
    (["lora", "--images", "IMAGES"], "no token"),
    (["lora", "--images", "IMAGES", "--token", " "], "the token is empty"),
    (["lora", "--images", "IMAGES", "--token", "<my token>"], "contains whitespace"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--model", "/no/such/model"], "does not exist"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--optimizer", "sgd"], "choose one of: adamw, adamw8bit"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--mixed-precision", "fp8"], "choose one of: auto, no, fp16, bf16"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--resume", "latest"], "--resume needs --output"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--resume", "latest", "--output", "IMAGES/run"],
     "--resume latest: no checkpoint in"),
    (["lora", "--images", "IMAGES/1f431.txt", "--token", "<sks>"], "is a file; pass the folder that holds the images"),
    (["merge", "--lora", "IMAGES/1f431.png", "--output", "x.safetensors", "--rank", "0"], "--rank must be >= 1, got 0"),
    (["generate", "x", "--lora", "/no/such.safetensors:0.5"], "not found"),
    (["generate", "x", "--size", "30"], "multiple of 8"),
    (["eval", "--prompt", "x", "--refs-b", "IMAGES"], "--refs-b needs --refs"),
    (["eval"], "either --prompts FILE or --prompt"),
    (["lora", "--images", "IMAGES", "--token", "<sks>", "--recipe", "/no/recipe.toml"], "recipe"),
])
def test_bad_input_is_one_line_exit_2(argv, message):
    code, out = run(*[a.replace("IMAGES", str(ROOT / "examples" / "cat")) for a in argv])
    assert code == 2, out
    assert message in out
    assert "Traceback" not in out
    assert len([line for line in out.splitlines() if line.startswith("error:")]) == 1


def test_model_folder_errors(tmp_path, concept_dir, tiny_model):
    (tmp_path / "empty").mkdir()
    code, out = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tmp_path / "empty")
    assert code == 2 and "no model_index.json" in out
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model_index.json").write_text((Path(tiny_model) / "model_index.json").read_text())
    (partial / "unet").mkdir()
    code, out = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", partial)
    assert code == 2 and "lacks the component(s) tokenizer, text_encoder, vae, scheduler" in out
    code, out = run("generate", "x", "--model", "someone/not-cached-model")
    assert code == 2 and "neither a folder nor a hub id in the local cache" in out


def test_lora_generate_eval_end_to_end(tiny_model, concept_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out]
    code, log = run("lora", *common, "--steps", "3", "--rank", "2", "--lr", "1e-2")
    assert code == 0, log
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["lora"]["rank"] == 2 and recipe["train"]["steps"] == 3 and recipe["data"]["token"] == "<sks>"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    before = (out / LORA).read_bytes()

    # a finished run is not overwritten by accident ...
    code, log = run("lora", *common, "--steps", "2")
    assert code == 2 and "already holds a finished run" in log
    assert (out / LORA).read_bytes() == before
    # ... only with --overwrite
    code, log = run("lora", *common, "--steps", "2", "--overwrite")
    assert code == 0, log
    assert json.loads((out / "recipe.json").read_text())["train"]["steps"] == 2

    gen = tmp_path / "gen"
    code, log = run("generate", "a photo of <sks>", "--model", tiny_model, "--lora", f"{out / LORA}:0.8",
                    "--steps", "3", "--num-images", "2", "--output", gen)
    assert code == 0, log
    assert sorted(p.name for p in gen.iterdir()) == ["generation.json", "grid.png", "image-000.png", "image-001.png"]
    settings = json.loads((gen / "generation.json").read_text())
    assert settings["loras"] == [{"file": str(out / LORA), "weight": 0.8}] and settings["seeds"] == [0, 1]

    ev = tmp_path / "eval"
    code, log = run("eval", "--prompt", "a photo of <sks>", "--num-images", "2", "--model", tiny_model,
                    "--lora", out / LORA, "--compare-model", tiny_model, "--set", concept_dir, "--steps", "3",
                    "--output", ev)
    assert code == 0, log
    metrics = json.loads((ev / "eval.json").read_text())
    assert metrics["n"] == 2 and metrics["set_distance"]["set_images"] == 3
    assert metrics["set_distance"]["model"] > 0 and metrics["set_distance"]["compare"] > 0
    assert metrics["drift"] > 0  # the LoRA changed the images
    assert "distance to set" in log and (ev / "grid.png").is_file()


def test_resume_from_cli_continues_the_run(tiny_model, concept_dir, tmp_path):
    out = tmp_path / "run"
    common = ["--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out, "--lr", "1e-2"]
    assert run("lora", *common, "--steps", "4")[0] == 0
    full = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]

    out2 = tmp_path / "run2"
    common[common.index(out)] = out2
    assert run("lora", *common, "--steps", "2", "--checkpoint-every", "1")[0] == 0  # stops at step 2 ...
    (out2 / "recipe.json").unlink()  # ... as if killed before the final save
    code, log = run("lora", *common, "--steps", "4", "--resume", "latest")
    assert code == 0, log
    resumed = [json.loads(line)["loss"] for line in (out2 / "metrics.jsonl").read_text().splitlines()]
    assert resumed[2:] == pytest.approx(full[2:], rel=1e-6)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_recipes_parse(recipe):
    parsed = read_recipe(recipe)
    for section in parsed:
        build(section, parsed, {})


def test_the_emoji_recipe_spells_out_the_bundled_bases_lora_settings():
    """recipes/lora-emoji.toml says it is the quickstart's settings; a recipe sits above adapt.json, so a stale
    copy would quietly train with other ones."""
    from adapt.models import BUNDLED_MODEL, model_defaults

    recommended = model_defaults(BUNDLED_MODEL)["lora"]
    assert {k: read_recipe(ROOT / "recipes" / "lora-emoji.toml")["train"][k] for k in recommended} == recommended


def test_the_shipped_adapt_json_is_what_the_base_build_writes():
    """examples/build_base/build.py writes adapt/base/adapt.json from its ADAPT_DEFAULTS; the two must not drift."""
    import importlib.util

    from adapt.models import BUNDLED_MODEL

    spec = importlib.util.spec_from_file_location("build_base", ROOT / "examples" / "build_base" / "build.py")
    build_base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_base)
    assert json.loads((BUNDLED_MODEL / "adapt.json").read_text()) == build_base.ADAPT_DEFAULTS


def test_recipe_values_are_defaults_flags_override(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nsteps = 7\nlr = 1\n[lora]\nrank = 8\n")
    parsed = read_recipe(path)
    assert build("train", parsed, {"steps": None}).steps == 7
    assert build("train", parsed, {"steps": 3}).steps == 3
    assert build("train", parsed, {}).lr == 1.0 and build("lora", parsed, {}).rank == 8
    path.write_text("[train]\nstepz = 7\n")
    with pytest.raises(Exception, match="unknown key 'stepz'"):
        read_recipe(path)


def test_model_recommended_settings_sit_below_recipes_and_flags(tiny_model, concept_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "adapt.json").write_text(json.dumps({"guidance": 2.0, "lora": {"lr": 0.02, "steps": 2}}))
    common = ["lora", "--images", concept_dir, "--token", "<sks>", "--model", model]
    assert run(*common, "--output", tmp_path / "a")[0] == 0
    train = json.loads((tmp_path / "a" / "recipe.json").read_text())["train"]
    assert (train["lr"], train["steps"]) == (0.02, 2)
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlr = 0.005\n")
    assert run(*common, "--recipe", recipe, "--steps", "1", "--output", tmp_path / "b")[0] == 0
    train = json.loads((tmp_path / "b" / "recipe.json").read_text())["train"]
    assert (train["lr"], train["steps"]) == (0.005, 1)
    code, log = run("generate", "x", "--model", model, "--steps", "1", "--output", tmp_path / "g")
    assert code == 0 and json.loads((tmp_path / "g" / "generation.json").read_text())["guidance"] == 2.0
    code, log = run("generate", "x", "--model", model, "--steps", "1", "--guidance", "5", "--output", tmp_path / "h")
    assert json.loads((tmp_path / "h" / "generation.json").read_text())["guidance"] == 5.0
