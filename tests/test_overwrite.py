"""--overwrite replaces a run folder whole: no file of the old run is left beside the new one's (a kohya file of
another --format, checkpoints a later --resume would take), a failed replacement gives the old run back, and a
finished run goes only once another has finished in its place. A folder with an unfinished run's checkpoints
is refused without --resume or --overwrite."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import adapt.train
from conftest import run

LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture
def common(tiny_model, concept_dir, tmp_path):
    return ["lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", tmp_path / "run"]


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_overwrite_leaves_nothing_of_the_old_run(common, tmp_path):
    out = tmp_path / "run"
    assert run(*common, "--steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "2")[0] == 0
    assert (out / "run.safetensors").is_file() and (out / "checkpoints" / "step-000002").is_dir()
    code, log = run(*common, "--steps", "2", "--format", "diffusers", "--overwrite")
    assert code == 0, log
    assert not (out / "run.safetensors").exists()  # the old kohya file, which ComfyUI would still load
    assert not (out / "checkpoints").exists()  # the old run's, which --resume latest would take
    assert json.loads((out / "recipe.json").read_text())["train"]["steps"] == 2
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / ".previous-run").exists()


def test_a_failed_overwrite_gives_the_old_run_back(common, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(*common, "--steps", "2")[0] == 0
    before = {f: (out / f).read_bytes() for f in _files(out)}

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapt.train, "diffusion_loss", broken)
    code, _ = run(*common, "--steps", "3", "--overwrite")
    assert code != 0
    assert {f: (out / f).read_bytes() for f in _files(out)} == before  # every file as it was, nothing more


def test_an_interrupted_overwrite_keeps_the_old_run_until_the_new_one_finishes(common, tmp_path, monkeypatch):
    out = tmp_path / "run"
    assert run(*common, "--steps", "2")[0] == 0
    old = (out / LORA).read_bytes()
    real, calls = adapt.train.diffusion_loss, {"n": 0}

    def fails_at_step_3(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(adapt.train, "diffusion_loss", fails_at_step_3)
    more = ["--steps", "4", "--checkpoint-every", "2"]
    assert run(*common, *more, "--overwrite")[0] != 0
    assert (out / ".previous-run" / LORA).read_bytes() == old and not (out / LORA).exists()
    code, log = run(*common, *more)  # neither continued nor replaced: refused, the checkpoints kept
    assert code == 2 and "holds the checkpoints of an unfinished run; pass --resume latest" in log
    monkeypatch.setattr(adapt.train, "diffusion_loss", real)
    code, log = run(*common, *more, "--resume", "latest")
    assert code == 0, log
    assert (out / LORA).is_file() and not (out / ".previous-run").exists()


def test_overwrite_keeps_the_runs_own_inputs_and_refuses_an_output_that_is_one(tiny_model, concept_dir, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(concept_dir, out / "images")
    args = ["lora", "--images", out / "images", "--token", "<sks>", "--model", tiny_model, "--output", out, "--steps", "1"]
    assert run(*args)[0] == 0
    code, log = run(*args, "--overwrite")
    assert code == 0, log
    assert _files(out / "images") == _files(concept_dir)
    for overwrite in ([], ["--overwrite"]):
        code, log = run("lora", "--images", out / "images", "--token", "<sks>", "--model", tiny_model, "--output",
                        out / "images", "--steps", "1", *overwrite)
        assert code == 2 and "is also an input of this run; pass another --output" in log
        assert _files(out / "images") == _files(concept_dir)


def test_a_finished_run_trains_on_with_resume_and_overwrite_however_its_folder_is_written(common, tmp_path, concept_dir,
                                                                                        caplog):
    """--resume latest --overwrite continues a finished run from its last checkpoint (its files are replaced when it
    ends), and the image folder may be written another way (relative here): the same folder is the same recipe."""
    import os

    caplog.set_level(logging.INFO, logger="adapt")
    out = tmp_path / "run"
    assert run(*common, "--steps", "4", "--checkpoint-every", "2")[0] == 0
    first = (out / "metrics.jsonl").read_text().splitlines()
    code, log = run(*common, "--steps", "6", "--checkpoint-every", "2", "--resume", "latest")
    assert code == 2 and "holds a finished run; to train it on from its last checkpoint pass --overwrite too" in log
    moved = [os.path.relpath(concept_dir) if a == concept_dir else a for a in common]
    code, log = run(*moved, "--steps", "6", "--checkpoint-every", "2", "--resume", "latest", "--overwrite")
    assert code == 0, log
    assert json.loads((out / "recipe.json").read_text())["train"]["steps"] == 6
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 6 and rows[:4] == first  # exact: steps 3-4 trained again from step 2's checkpoint
    assert "(step 2)" in caplog.text and "resumed from" in caplog.text


def test_overwrite_moves_only_the_runs_own_files_and_a_failure_after_the_recipe_gives_the_old_run_back(common, tmp_path,
                                                                                                     monkeypatch):
    import adapt.formats

    out = tmp_path / "run"
    assert run(*common, "--steps", "2")[0] == 0
    (out / "notes.txt").write_text("mine")
    (out / "other-run").mkdir()
    (out / "other-run" / "keep.safetensors").write_bytes(b"x")
    before = {f: (out / f).read_bytes() for f in _files(out)}
    real = adapt.formats.save_lora

    def saves_then_fails(*a, **k):  # everything written, the recipe too, then an error (a full disk, say)
        real(*a, **k)
        raise OSError("boom")

    monkeypatch.setattr(adapt.formats, "save_lora", saves_then_fails)
    assert run(*common, "--steps", "3", "--overwrite")[0] != 0
    assert {f: (out / f).read_bytes() for f in _files(out)} == before
    monkeypatch.setattr(adapt.formats, "save_lora", real)
    assert run(*common, "--steps", "3", "--overwrite")[0] == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / "other-run" / "keep.safetensors").read_bytes() == b"x"


def test_a_left_replacement_never_costs_the_runs_inputs(tiny_model, concept_dir, tmp_path, monkeypatch):
    """A replacement killed outright (SIGKILL: no clean-up) leaves the old run in .previous-run; the next run there
    that fails gives it back, and the images inside the folder stay where they are."""
    import shutil

    from adapt.fileio import run_entries

    out = tmp_path / "run"
    shutil.copytree(concept_dir, out / "images")
    args = ["lora", "--images", out / "images", "--token", "<sks>", "--model", tiny_model, "--output", out, "--steps", "1"]
    assert run(*args)[0] == 0
    old = {f: (out / f).read_bytes() for f in _files(out)}
    (out / ".previous-run").mkdir()
    for entry in run_entries(out):
        entry.rename(out / ".previous-run" / entry.name)  # as the killed --overwrite left it
    monkeypatch.setattr(adapt.train, "diffusion_loss", lambda *a, **k: 1 / 0)
    assert run(*args)[0] != 0
    assert {f: (out / f).read_bytes() for f in _files(out)} == old and not (out / ".previous-run").exists()


def test_only_path_settings_count_as_inputs(concept_dir, tmp_path):
    """A word that names a folder (--init-token cat, with ./cat the output) is not an input, a prompt too long for a
    file name is no error, and a class-image folder set in a recipe inside the output is kept by --overwrite."""
    from adapt.plan import make_plan

    (tmp_path / "cat").mkdir()
    base = {"images": concept_dir, "token": "<sks>", "prompt": "a" * 300 + " {token}", "overwrite": True}
    plan = make_plan("lora", {**base, "pivotal": True, "init_token": "cat", "output": Path("cat")})
    assert plan.inputs == frozenset()
    recipe = tmp_path / "r.toml"
    recipe.write_text('[dreambooth]\nclass_images = "cat/cls"\n')
    (tmp_path / "cat" / "cls").mkdir()
    plan = make_plan("dreambooth", {**base, "class_word": "cat", "recipe": recipe, "output": Path("cat")})
    assert plan.inputs == {"cls"}


@pytest.mark.parametrize("method,extra", [
    ("lora", ["--validation-prompt", "a photo of <sks>", "--validation-split", "0.34", "--checkpoint-every", "1",
              "--ema-decay", "0.9", "--save-ema", "both"]),
    ("textual-inversion", ["--init-token", "cat", "--format", "a1111"]),
    ("dreambooth", ["--no-prior-preservation"]),
])
def test_every_file_a_run_writes_is_one_overwrite_replaces(method, extra, tiny_model, concept_dir, tmp_path):
    """fileio.run_entries names what --overwrite moves aside: it must cover all a run writes (else an old run's file
    of a kind it misses would stay beside the new run's)."""
    from adapt.fileio import run_entries

    out = tmp_path / "run"
    code, log = run(method, "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out,
                    "--steps", "2", *extra)
    assert code == 0, log
    assert sorted(e.name for e in run_entries(out)) == sorted(e.name for e in out.iterdir() if e.name != ".adapt.lock")
