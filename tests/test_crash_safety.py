"""Crash safety: a SIGKILLed run resumes exactly, saves are atomic, a full disk is a one-line
error that keeps the old file, a non-finite loss stops before it reaches the weights."""

from __future__ import annotations

import errno
import shutil
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import adapt.train
from adapt.checkpoint import list_checkpoints
from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

ROOT = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"


def _losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_model, concept_dir, tmp_path):
    from safetensors.torch import load_file

    def cmd(out, *extra):
        return [sys.executable, "-m", "adapt", "lora", "--images", str(concept_dir), "--token", "<sks>", "--model",
                str(tiny_model), "--output", str(out), "--steps", "400", "--batch-size", "2", "--lr", "1e-2",
                "--random-flip", "--caption-dropout", "0.2", "--checkpoint-every", "40", "--keep-checkpoints", "2", *extra]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True, env=env)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while not list_checkpoints(killed / "checkpoints") or list_checkpoints(killed / "checkpoints")[-1].name < "step-000080":
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / LORA).exists()  # it really died mid-run
    last = list_checkpoints(killed / "checkpoints")[-1]
    resumed_from = int(last.name.split("-")[1])

    subprocess.run(cmd(killed, "--resume", "latest"), check=True, capture_output=True, env=env)
    full, again = _losses(tmp_path / "full"), _losses(killed)
    assert len(again) == len(full) == 400
    assert again[resumed_from:] == full[resumed_from:]
    a, b = load_file(str(tmp_path / "full" / LORA)), load_file(str(killed / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_crash_during_checkpoint_save_leaves_the_previous_one_usable(tiny_model, concept_dir, tmp_path, monkeypatch):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    cfg = dict(steps=6, lr=1e-2, checkpoint_every=2, keep_checkpoints=5)
    import safetensors.torch

    real, calls = safetensors.torch.save_file, {"n": 0}

    def crash_on_second_checkpoint(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # trainable.safetensors of the second checkpoint
            raise RuntimeError("power cut")
        return real(*a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_checkpoint)
    with pytest.raises(RuntimeError, match="power cut"):
        train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg), tmp_path, resolution=16,
              progress=False)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["step-000002"]  # no half-written folder left behind
    result = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
                   tmp_path, resolution=16, progress=False)
    assert result["steps"] == 6 and (tmp_path / LORA).is_file()


def test_disk_full_while_saving_is_one_line_and_keeps_the_old_file(tiny_model, concept_dir, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    common = ["lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out, "--steps", "2"]
    assert run(*common)[0] == 0
    before = (out / LORA).read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, log = run(*common, "--overwrite", "--lr", "1e-2")
    assert code == 2 and "no space left on the device while writing" in log and "Traceback" not in log
    assert (out / LORA).read_bytes() == before
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_nonfinite_loss_stops_before_the_weights_or_is_skipped(tiny_model, concept_dir, tmp_path, monkeypatch):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    real, calls = adapt.train.diffusion_loss, {"n": 0}

    def nan_at_step_5(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(adapt.train, "diffusion_loss", nan_at_step_5)
    c = load_components(tiny_model)
    with pytest.raises(AdaptError, match=r"loss became nan at step 5; .*step-000004.*fp16.*--lr.*--skip-nonfinite"):
        train(c, LoraMethod(LoraConfig()), examples, TrainConfig(steps=8, lr=1e-2, checkpoint_every=2), tmp_path / "a",
              resolution=16, progress=False)
    assert all(torch.isfinite(p).all() for p in c.unet.parameters())  # the NaN never reached the weights

    calls["n"] = 0
    c = load_components(tiny_model)
    cfg = dict(steps=8, lr=1e-2, skip_nonfinite=True, checkpoint_every=6)
    result = train(c, LoraMethod(LoraConfig()), examples, TrainConfig(**cfg), tmp_path / "b", resolution=16, progress=False)
    assert result["steps"] == 8 and calls["n"] == 9 and all(np.isfinite(result["losses"]))
    assert all(torch.isfinite(p).all() for p in c.unet.parameters())
    # resumed after the skip (from step 6), the run still counts it: report.md's count is the whole run's
    monkeypatch.setattr(adapt.train, "diffusion_loss", real)
    shutil.copytree(tmp_path / "b" / "checkpoints", tmp_path / "c" / "checkpoints")
    resumed = train(load_components(tiny_model), LoraMethod(LoraConfig()), examples, TrainConfig(**cfg, resume="latest"),
                    tmp_path / "c", resolution=16, progress=False)
    assert result["skipped"] == resumed["skipped"] == 1 and resumed["losses"] == result["losses"]
