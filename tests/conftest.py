"""Shared fixtures: a tiny SD-layout model built from configs (real CLIP tokenizer, random weights)
and a few small concept images. Everything is offline and takes seconds."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


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
def _run_in_tmp(tmp_path, monkeypatch):
    """Commands that write to ./outputs by default write into the test's own folder."""
    monkeypatch.chdir(tmp_path)
