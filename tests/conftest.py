"""Shared fixtures: a tiny SD-layout model built from configs (real CLIP tokenizer, random weights)
and a few small concept images. Everything is offline and takes seconds."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# pytest-xdist workers (pyproject: -n 2): one thread each, here and in the subprocesses they start. The small
# models gain little from a second thread (150 LoRA steps on the bundled base: 36 s on one, 28 s on two), so two
# workers of one thread get through more tests than one worker of two. Read by torch when it is first imported.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Training keeps a disk cache (default ~/.cache/adapt): never the user's own. Each test gets its own
# (below); this one serves environments copied before that (a subprocess's env built at import).
os.environ["ADAPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="adapt-test-cache-")
atexit.register(shutil.rmtree, os.environ["ADAPT_CACHE_DIR"], ignore_errors=True)


def run(*args):
    """`adapt ARGS...` in this process: (exit code, stdout and stderr interleaved). Test files import
    it (`from conftest import run`); pytest puts tests/ on the path."""
    from typer.testing import CliRunner

    from adapt.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from adapt.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.fixture(scope="session")
def tiny_v_model(tmp_path_factory):
    from adapt.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "model", seed=0, prediction_type="v_prediction")


def make_concept_images(folder, n=3, size=24):
    """Coloured discs on a transparent background (RGBA, like emoji)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(0)
    for i in range(n):
        img = Image.new("RGBA", (size, size), (0, 0, 0, 0))
        d = ImageDraw.Draw(img)
        colour = tuple(int(c) for c in rng.randint(0, 255, 3)) + (255,)
        r = size // 3 + i
        d.ellipse([size // 2 - r, size // 2 - r, size // 2 + r, size // 2 + r], fill=colour)
        img.save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="session")
def concept_dir(tmp_path_factory):
    return make_concept_images(tmp_path_factory.mktemp("concept") / "images")


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, tmp_path_factory, monkeypatch):
    """Commands that write to ./outputs by default write into the test's own folder, and the disk
    cache of latents and text embeddings is the test's own (no test reads another's entries)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ADAPT_CACHE_DIR", str(tmp_path_factory.mktemp("adapt-cache")))


@pytest.fixture
def standard_clip_keys():
    """Checks a saved text-encoder folder: its keys are the standard CLIP layout (transformers 4.x
    names: `text_model.` before all but text_projection), the names of a freshly built model of the
    same config, and transformers loads exactly those tensors."""

    def check(folder):
        import torch
        from safetensors.torch import load_file
        from transformers import AutoConfig, CLIPTextModel, CLIPTextModelWithProjection

        config = AutoConfig.from_pretrained(folder)
        cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in config.architectures else CLIPTextModel
        saved = load_file(str(folder / "model.safetensors"))
        fresh = cls(config).state_dict()
        names = {k: k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}" for k in fresh}
        assert set(saved) == set(names.values())
        assert {"text_model.embeddings.token_embedding.weight", "text_model.final_layer_norm.weight",
                "text_model.encoder.layers.0.self_attn.q_proj.weight"} <= set(saved)
        loaded = cls.from_pretrained(folder).state_dict()
        assert all(torch.equal(loaded[k], saved[names[k]]) for k in fresh)

    return check


@pytest.fixture(scope="module")
def fault_table(request, tmp_path_factory):
    """The fault-injection modules' table of (fault, outcome, data lost), see faults_kit.py."""
    import faults_kit  # here, not at the top: it imports torch, after the thread setting above

    yield
    module = request.module.__name__
    lines = ["| fault | outcome | data lost |", "|---|---|---|"]
    lines += [f"| {r['fault']} | {r['outcome']} | {r['lost']} |" for r in faults_kit.ROWS.pop(module, [])]
    table = "\n".join(lines)
    path = tmp_path_factory.getbasetemp() / f"fault-table-{module}.md"
    path.write_text(table + "\n")
    print(f"\n\n{table}\n\n(table also in {path})")


@pytest.fixture
def no_process_left():
    """Kill what faults_kit.start started and a test left running."""
    import faults_kit

    yield
    for proc in faults_kit.PROCS:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    faults_kit.PROCS.clear()


@pytest.fixture
def fault(request):
    """fault(name, outcome): fill this test's row, once its checks have passed."""
    import faults_kit

    row = {"fault": request.node.name, "outcome": "FAILED", "lost": "not checked"}
    faults_kit.ROWS.setdefault(request.module.__name__, []).append(row)
    return lambda name, outcome: row.update(fault=name, outcome=outcome, lost="none")
