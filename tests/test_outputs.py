"""Where the tools write: a wrong --output is a one-line error before any work (it was a traceback after all of it:
IsADirectoryError, NotADirectoryError, FileExistsError), an earlier generate's or eval's folder is replaced only with
--overwrite, and a replaced generate folder keeps no image of the earlier, larger run."""

from __future__ import annotations

import json

import pytest

import adapt.infer
from conftest import run


@pytest.fixture
def no_render(monkeypatch):
    """A refused command must not get as far as loading a model."""
    def fail(*a, **k):
        raise AssertionError("loaded a pipeline before checking --output")

    monkeypatch.setattr(adapt.infer, "load_pipeline", fail)


def _one_line_error(code, log, message):
    assert code == 2 and message in log and "Traceback" not in log and len(log.strip().splitlines()) == 1, log


def test_convert_and_merge_write_one_safetensors_file(tmp_path, no_render):
    lora = tmp_path / "a.safetensors"
    lora.write_bytes(b"")  # never read: the output is refused first
    (tmp_path / "folder").mkdir()
    for output, message in (("folder", "is a folder; name the .safetensors file to write in it"),
                            ("noext", ": name the .safetensors file to write")):
        for args in (["convert", lora, "--to", "kohya"], ["merge", "--lora", lora]):
            code, log = run(*args, "--output", tmp_path / output, "--overwrite")
            _one_line_error(code, log, f"--output {tmp_path / output}{'' if message[0] == ':' else ' '}{message}")
    (tmp_path / "model.txt").write_text("mine")
    code, log = run("merge", "--lora", lora, "--into-model", tmp_path / "model.txt", "--overwrite")
    _one_line_error(code, log, f"--into-model {tmp_path / 'model.txt'} is a file; pass a folder")
    assert (tmp_path / "model.txt").read_text() == "mine"


@pytest.mark.parametrize("command,marker", [("generate", "generation.json"), ("eval", "eval.json")])
def test_generate_and_eval_refuse_a_file_or_an_earlier_runs_folder(command, marker, tmp_path, no_render):
    args = ["generate", "x"] if command == "generate" else ["eval", "--prompt", "x"]
    (tmp_path / "file.png").write_bytes(b"mine")
    _one_line_error(*run(*args, "--output", tmp_path / "file.png"), f"--output {tmp_path / 'file.png'} is a file; pass a folder")
    (tmp_path / "earlier").mkdir()
    (tmp_path / "earlier" / marker).write_text("{}")
    _one_line_error(*run(*args, "--output", tmp_path / "earlier"),
                    f"already holds an earlier run's {marker}; pass another --output or --overwrite to replace it")
    assert (tmp_path / "file.png").read_bytes() == b"mine" and (tmp_path / "earlier" / marker).read_text() == "{}"


def test_generate_overwrite_replaces_the_earlier_images(tiny_model, tmp_path):
    out = tmp_path / "gen"
    common = ["generate", "a photo of x", "--model", tiny_model, "--steps", "2", "--output", out]
    assert run(*common, "--num-images", "3")[0] == 0
    code, log = run(*common, "--num-images", "1", "--seed", "5", "--overwrite")
    assert code == 0, log
    assert sorted(p.name for p in out.iterdir()) == ["generation.json", "grid.png", "image-000.png"]
    assert json.loads((out / "generation.json").read_text())["seeds"] == [5]


def test_generate_into_a_folder_of_ones_own_images_leaves_them(tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "image-007.png").write_bytes(b"my picture")  # no generation.json: not an earlier generate's
    assert run("generate", "a photo of x", "--model", tiny_model, "--steps", "2", "--output", out)[0] == 0
    assert (out / "image-007.png").read_bytes() == b"my picture" and (out / "image-000.png").is_file()
