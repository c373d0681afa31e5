"""Start-up: a training command imports only what it uses (issue 16, item 4). Each run is the
console script in a fresh process (`adapt.cli.main`, as `adapt ...` runs), then reports which of
the optional or unused packages it loaded."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import run

WATCHED = ("bitsandbytes", "boto3", "scipy", "datasets", "tensorboard", "diffusers",
           "diffusers.pipelines.stable_diffusion")  # the last: the SD pipeline classes (models.assemble_pipeline)
PROBE = f"""
import json, sys
sys.argv = ["adapt", *sys.argv[1:]]
from adapt.cli import main
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps({{"code": code, "loaded": [n for n in {WATCHED!r} if sys.modules.get(n) is not None]}}))
"""


def loaded_by(*args, cwd) -> set[str]:
    """Run `adapt ARGS` as its own process; the WATCHED packages it loaded."""
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] in (0, None), out.stderr[-3000:]
    return set(result["loaded"])


def test_a_plain_training_run_loads_no_optional_package(tiny_model, concept_dir, tmp_path):
    """No 8-bit optimizer, data set, tracker, sampler that needs scipy, or rendering: none of
    bitsandbytes, datasets, tensorboard, scipy, boto3 or the SD pipeline classes is imported."""
    loaded = loaded_by("lora", "--images", concept_dir, "--token", "<t>", "--model", tiny_model, "--steps", "1",
                       "--resolution", "16", "--output", tmp_path / "run", cwd=tmp_path)
    assert loaded == {"diffusers"}


def test_options_load_what_they_need(tiny_model, concept_dir, tmp_path):
    """--dataset loads datasets, --log-with tensorboard tensorboard, --validation-prompt and class
    images the pipeline classes; class images and validation render with scipy deferred, and
    --class-scheduler lms (which needs scipy) gets it."""
    folder = tmp_path / "data"
    folder.mkdir()
    for i, image in enumerate(sorted(concept_dir.glob("*.png"))):
        (folder / f"{i}.png").write_bytes(image.read_bytes())
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a photo of {token}"}) + "\n"
                                                   for i in range(len(list(folder.glob("*.png"))))))
    common = ["dreambooth", "--token", "<t>", "--class-word", "cat", "--num-class-images", "1", "--class-steps", "2",
              "--model", tiny_model, "--steps", "1", "--resolution", "16"]
    loaded = loaded_by(*common, "--dataset", folder, "--log-with", "tensorboard", "--validation-prompt", "a <t>",
                       "--validation-steps", "2", "--class-images", tmp_path / "class-a", "--output", tmp_path / "a",
                       cwd=tmp_path)
    assert loaded == {"diffusers", "datasets", "tensorboard", "diffusers.pipelines.stable_diffusion"}
    assert (tmp_path / "class-a" / "class-00000.png").is_file() and (tmp_path / "a" / "validation" / "final.png").is_file()

    loaded = loaded_by(*common, "--images", concept_dir, "--class-scheduler", "lms", "--class-images", tmp_path / "class-b",
                       "--output", tmp_path / "b", cwd=tmp_path)
    assert loaded == {"diffusers", "scipy", "diffusers.pipelines.stable_diffusion"}
    assert (tmp_path / "class-b" / "class-00000.png").is_file()


def test_a_run_in_a_shared_process_defers_nothing_more(tiny_model, concept_dir):
    """In-process (tests, notebooks) a run hides no RUN_DEFERRABLE package: the process may render
    with lms afterwards, and transformers and diffusers decide once what is installed."""
    code, log = run("lora", "--images", concept_dir, "--token", "<t>", "--model", tiny_model, "--steps", "1",
                    "--resolution", "16")
    assert code == 0, log
    assert sys.modules.get("scipy", "absent") is not None and importlib.util.find_spec("scipy") is not None
