"""Fault injection: the faults of rented and shared GPUs each end in a clear message with nothing lost.

Every test adds a row (fault, outcome, data lost) to a table that is printed when the module ends
(`pytest -s tests/test_faults.py`) and written to <pytest's basetemp>/fault-table.md. A row says
"data lost: none" only after the test has checked it (weights bit-identical, previous checkpoint
intact, files whole); a failing test leaves its row as FAILED.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapt.checkpoint import damage, find_checkpoint, list_checkpoints
from adapt.cli import app
from adapt.errors import AdaptError
from adapt.signals import REPEAT_SECONDS

INJECT = Path(__file__).with_name("faults_inject.py")
LORA = "pytorch_lora_weights.safetensors"
STEPS = 40
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ROWS: list[dict] = []
PROCS: list[subprocess.Popen] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table(tmp_path_factory):
    yield
    lines = ["| fault | outcome | data lost |", "|---|---|---|"]
    lines += [f"| {r['fault']} | {r['outcome']} | {r['lost']} |" for r in ROWS]
    table = "\n".join(lines)
    path = tmp_path_factory.getbasetemp() / "fault-table.md"
    path.write_text(table + "\n")
    print(f"\n\n{table}\n\n(table also in {path})")


@pytest.fixture(autouse=True)
def _no_process_left():
    yield
    for proc in PROCS:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    PROCS.clear()


@pytest.fixture
def fault(request):
    """fault(name, outcome): fill this test's row, once its checks have passed."""
    row = {"fault": request.node.name, "outcome": "FAILED", "lost": "not checked"}
    ROWS.append(row)
    return lambda name, outcome: row.update(fault=name, outcome=outcome, lost="none")


def lora_args(concept_dir, model, out, *extra):
    return ["adapt", "lora", "--images", str(concept_dir), "--token", "<sks>", "--model", str(model), "--output", str(out),
            "--steps", str(STEPS), "--batch-size", "2", "--lr", "1e-2", "--random-flip", "--caption-dropout", "0.2", *extra]


def start(args, *faults, **kw):
    """`adapt ARGS` in a subprocess, through faults_inject.py with the given faults."""
    proc = subprocess.Popen([sys.executable, str(INJECT), *faults, "--", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    PROCS.append(proc)
    return proc


def finish(proc, timeout=900):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def losses(folder):
    return [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]


def wait_for_step(folder, step, proc, timeout=900):
    deadline = time.time() + timeout
    while not (folder / "metrics.jsonl").is_file() or len((folder / "metrics.jsonl").read_text().splitlines()) < step:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.01)


def same_weights(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def leftovers(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".adapt.lock")


@pytest.fixture(scope="module")
def reference(tiny_model, concept_dir, tmp_path_factory):
    """An uninterrupted run: what every interrupted one must equal, bit for bit."""
    out = tmp_path_factory.mktemp("reference") / "run"
    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out), cwd=out.parent))
    assert code == 0, err[-2000:]
    return out


# --- 1. graceful stop ------------------------------------------------------------------------------

def test_sigterm_at_a_random_step_checkpoints_and_resumes_bit_identical(tiny_model, concept_dir, reference, tmp_path, fault):
    target = random.Random(19).randint(5, STEPS - 10)
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out))  # no --checkpoint-every: the stop writes the only one
    wait_for_step(out, target, proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    took = time.monotonic() - sent
    [ckpt] = list_checkpoints(out / "checkpoints")
    stopped = int(ckpt.name.split("-")[1])
    assert code == 143, err[-2000:]
    assert f"stopped by SIGTERM after step {stopped} of {STEPS}; checkpoint {ckpt}. Continue with --resume latest" in err
    assert target <= stopped < STEPS and len(losses(out)) == stopped and damage(ckpt) is None

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert losses(out) == losses(reference) and same_weights(out / LORA, reference / LORA)
    fault(f"SIGTERM at step {target} (seeded)", f"checkpoint of step {stopped} written, exit 143 {took:.1f} s after "
          "the signal; resumed losses and weights bit-identical")


def test_a_second_sigint_stops_at_once_and_keeps_what_was_written(tiny_model, concept_dir, reference, tmp_path, fault):
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out, "--checkpoint-every", "10"), "--slow-step", "25", "600")
    wait_for_step(out, 24, proc)  # step 25 takes 10 minutes
    proc.send_signal(signal.SIGINT)
    time.sleep(REPEAT_SECONDS + 0.5)
    assert proc.poll() is None  # the first one waits for the step to end
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    code, _, err = finish(proc)
    took = time.monotonic() - sent
    assert code == 130 and "SIGINT: stopping after this step" in err and "interrupted; files already written" in err
    assert took < 300  # not the 10 minutes the step would have taken
    kept = list_checkpoints(out / "checkpoints")
    assert [p.name for p in kept] == ["step-000010", "step-000020"] and all(damage(p) is None for p in kept)
    assert len(losses(out)) == 24 and leftovers(out) == []

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert losses(out) == losses(reference) and same_weights(out / LORA, reference / LORA)
    fault("second SIGINT during a step", f"exit 130 {took:.1f} s after it (the step had 10 minutes to go); checkpoints "
          "10, 20 intact; resumed run bit-identical")


def test_kill_during_the_final_save(tiny_model, concept_dir, reference, tmp_path, fault):
    out = tmp_path / "run"
    proc = start(lora_args(concept_dir, tiny_model, out, "--checkpoint-every", "20"), "--die-writing", LORA, "1")
    code, _, err = finish(proc)
    assert code == -signal.SIGKILL, err[-2000:]
    assert not (out / LORA).exists() and not (out / "recipe.json").exists()  # no half file under the real name
    [last] = list_checkpoints(out / "checkpoints")
    assert len(leftovers(out)) == 1 and damage(last) is None

    code, _, err = finish(start(lora_args(concept_dir, tiny_model, out, "--resume", "latest")))
    assert code == 0, err[-2000:]
    assert "removed 1 partial file(s)" in err and leftovers(out) == []
    assert same_weights(out / LORA, reference / LORA)
    fault("SIGKILL halfway through writing the final LoRA", f"no file under the real name; --resume latest from {last.name} "
          "removes the partial file and writes the bit-identical LoRA")


# --- 2. one writer per folder ----------------------------------------------------------------------

def test_a_live_run_holds_its_folder_and_a_killed_runs_lock_is_taken_over(tiny_model, concept_dir, tmp_path, fault,
                                                                         monkeypatch, caplog):
    import adapt.launch  # imported now, so the patch below meets the name the run calls, alone or in a suite

    out = tmp_path / "run"
    holder = start(lora_args(concept_dir, tiny_model, out, "--steps", "100000", "--checkpoint-every", "10"))
    wait_for_step(out, 12, holder)

    def never(*a, **k):
        raise AssertionError("the refused run loaded a model")

    monkeypatch.setattr(adapt.launch, "load_components", never)
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, out, "--steps", "100000")[1:])
    assert result.exit_code == 2 and f"is in use by PID {holder.pid}, a training run" in result.output
    monkeypatch.undo()

    holder.kill()
    holder.wait()
    assert (out / ".adapt.lock").is_file()  # the killed run's, stale
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, out, "--steps", "20", "--checkpoint-every", "10",
                                               "--resume", "latest")[1:])
    assert result.exit_code == 0, result.output
    assert f"took over the lock of PID {holder.pid}, which is no longer running" in caplog.text
    assert (out / LORA).is_file() and not (out / ".adapt.lock").exists()
    fault("second run into a folder a live run holds; then the holder SIGKILLed",
          f"refused at once naming PID {holder.pid}; the stale lock taken over, run resumed and finished")


def test_a_run_that_fails_at_set_up_leaves_no_empty_folder_and_keeps_a_users(tiny_model, concept_dir, tmp_path, fault):
    from adapt.locks import FolderLock

    new = tmp_path / "new" / "run"  # neither folder exists yet
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, new, "--resume", "latest")[1:])
    assert result.exit_code == 2 and "no checkpoint in" in result.output, result.output
    assert not (tmp_path / "new").exists()  # the run made both folders and removed both

    mine = tmp_path / "mine"
    mine.mkdir()
    result = CliRunner().invoke(app, lora_args(concept_dir, tiny_model, mine, "--resume", "latest")[1:])
    assert result.exit_code == 2 and mine.is_dir() and list(mine.iterdir()) == []  # the user's own folder stays

    with pytest.raises(AdaptError):
        with FolderLock(tmp_path / "a" / "b", "a training run"):
            (tmp_path / "a" / "b" / "kept.txt").write_text("written before the failure")
            raise AdaptError("set-up failed")
    assert (tmp_path / "a" / "b" / "kept.txt").read_text() == "written before the failure"
    fault("a run fails at set-up (--resume latest with no checkpoint) in a folder it created",
          "exit 2 with the reason; the folders it created are gone, a folder the user made or one with a file in it stays")


def test_two_dreambooth_runs_share_the_class_image_cache(tiny_model, tmp_path, fault):
    barrier, root = tmp_path / "barrier", tmp_path / "cache"
    barrier.mkdir()
    procs = [start(["class-images", str(tiny_model), str(root), "4", str(barrier)]) for _ in range(2)]
    deadline = time.time() + 900
    while len(list(barrier.glob("ready-*"))) < 2:
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.01)
    (barrier / "go").touch()  # both ask for the same 4 images at the same moment
    results = []
    for p in procs:
        code, stdout, err = finish(p)
        assert code == 0, err[-2000:]
        results.append(json.loads(stdout.splitlines()[-1]))
    assert sorted(r["rendered"] for r in results) == [0, 4]  # each image rendered once
    assert results[0]["files"] == results[1]["files"] == [f"class-{i:05d}.png" for i in range(4)]
    [folder] = root.iterdir()
    manifest = json.loads((folder / "manifest.json").read_text())
    assert sorted(i["file"] for i in manifest["images"]) == results[0]["files"]
    fault("two DreamBooth processes start on one class-image cache", "one renders 4 images, the other waits and reuses "
          "them; manifest lists each image once")


def test_kill_during_class_image_generation(tiny_model, tmp_path, fault, caplog):
    from adapt.classimages import ensure_class_images
    from adapt.images import load_rgb

    root = tmp_path / "cache"
    code, _, err = finish(start(["class-images", str(tiny_model), str(root), "5"], "--die-writing", "class-*.png", "3"))
    assert code == -signal.SIGKILL, err[-2000:]
    [folder] = root.iterdir()
    assert sorted(p.name for p in folder.glob("class-*.png")) == ["class-00000.png", "class-00001.png"]
    assert len(json.loads((folder / "manifest.json").read_text())["images"]) == 2

    kw = dict(scheduler="euler", steps=2, batch_size=1, progress=False)
    again, files = ensure_class_images(str(tiny_model), "a photo of cat", 5, 16, cache_root=root, **kw)
    assert again == folder and "took over the lock of PID" in caplog.text and leftovers(folder) == []
    _, fresh = ensure_class_images(str(tiny_model), "a photo of cat", 5, 16, cache_root=tmp_path / "fresh", **kw)
    assert [list(load_rgb(a).getdata()) == list(load_rgb(b).getdata()) for a, b in zip(files, fresh)] == [True] * 5
    assert [i["file"] for i in json.loads((folder / "manifest.json").read_text())["images"]] == [f.name for f in files]
    fault("SIGKILL halfway through writing class image 3 of 5", "2 whole images kept; the next run takes the stale lock, "
          "drops the partial file, renders 3 more, equal to a fresh set")


# --- 3. portable, verified checkpoints -------------------------------------------------------------

def test_a_checkpoint_moves_from_two_processes_to_one(tiny_model, concept_dir, tmp_path, fault):
    import numpy as np

    common = ["adapt", "lora", "--images", str(concept_dir), "--token", "<sks>", "--model", str(tiny_model), "--steps", "6",
              "--lr", "1e-2", "--lr-scheduler", "linear", "--warmup-steps", "2", "--random-flip", "--checkpoint-every", "3"]
    for name, extra in (("two", ["--batch-size", "1", "--num-processes", "2"]), ("one", ["--batch-size", "2"])):
        code, _, err = finish(start([*common, "--output", str(tmp_path / name), *extra]))
        assert code == 0, err[-2000:]
    for name in ("moved", "wrong"):  # the checkpoint alone, copied to "another machine"
        shutil.copytree(tmp_path / "two" / "checkpoints" / "step-000003", tmp_path / name / "checkpoints" / "step-000003")
    result = CliRunner().invoke(app, [*common[1:], "--output", str(tmp_path / "wrong"), "--batch-size", "1", "--resume", "latest"])
    assert result.exit_code == 2 and "Resume with the same global batch: --batch-size 2" in result.output

    code, _, err = finish(start([*common, "--output", str(tmp_path / "moved"), "--batch-size", "2", "--resume", "latest"]))
    assert code == 0, err[-2000:]
    assert "made with 2 process(es), this run has 1 (the same global batch of 2)" in err and "not bit for bit" in err
    one, moved = ([json.loads(r) for r in (tmp_path / n / "metrics.jsonl").read_text().splitlines()] for n in ("one", "moved"))
    assert [r["step"] for r in moved] == [4, 5, 6] and [r["lr"] for r in moved] == [r["lr"] for r in one[3:]]
    assert np.allclose([r["loss"] for r in moved], [r["loss"] for r in one[3:]], rtol=1e-4)
    a, b = load_file(str(tmp_path / "one" / LORA)), load_file(str(tmp_path / "moved" / LORA))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert diff < 2e-3
    fault("checkpoint of a 2-process run resumed by 1 process (same global batch) elsewhere",
          f"continues, says it is not bit-exact; LR schedule identical, weights within {diff:.0e} of a 1-process run; "
          "a different global batch is refused naming the --batch-size to use")


BASE = dict(steps=8, lr=1e-2, checkpoint_every=2, keep_checkpoints=5)


def train_run(model, concept_dir, out, **cfg):
    from adapt.config import LoraConfig
    from adapt.data import instance_examples
    from adapt.methods.lora import LoraMethod
    from adapt.models import load_components
    from adapt.train import train
    from adapt.train_config import TrainConfig

    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    return train(load_components(model), LoraMethod(LoraConfig()), examples, TrainConfig(**{**BASE, **cfg}), out,
                 resolution=16, progress=False)


@pytest.fixture(scope="module")
def inproc_reference(tiny_model, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inproc")
    train_run(tiny_model, concept_dir, out)
    return out


def test_a_checkpoint_from_another_device_type_continues_and_says_so(tiny_model, concept_dir, tmp_path, fault, caplog):
    from safetensors.torch import save_file

    from adapt.checkpoint import write_manifest

    train_run(tiny_model, concept_dir, tmp_path, steps=4)
    ckpt = list_checkpoints(tmp_path / "checkpoints")[0]
    rng = load_file(str(ckpt / "rng.safetensors"))
    rng["step"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state (seed, offset), as a GPU run saves it
    save_file(rng, str(ckpt / "rng.safetensors"))
    loop = json.loads((ckpt / "loop.json").read_text())
    loop["world"]["device"] = "cuda"
    (ckpt / "loop.json").write_text(json.dumps(loop))
    write_manifest(ckpt)
    result = train_run(tiny_model, concept_dir, tmp_path, steps=4, resume="latest")
    assert result["steps"] == 4 and all(map(lambda v: v == v, result["losses"]))
    assert "was made on cuda, this run is on cpu" in caplog.text
    assert "the step generator cannot move between device types and was reseeded" in caplog.text
    fault("checkpoint made on a GPU resumed on CPU", "continues from the same weights, optimizer and data order; says "
          "the noise generator was reseeded (not bit-exact)")


def test_a_damaged_checkpoint_is_named_and_latest_falls_back(tiny_model, concept_dir, inproc_reference, tmp_path, fault,
                                                             caplog):
    train_run(tiny_model, concept_dir, tmp_path)
    root = tmp_path / "checkpoints"
    ck2, ck4, ck6 = list_checkpoints(root)
    whole = (ck6 / "trainable.safetensors").read_bytes()
    (ck6 / "trainable.safetensors").write_bytes(whole[: len(whole) // 2])  # a truncated copy
    raw = bytearray((ck4 / "optimizer.pt").read_bytes())
    raw[len(raw) // 2] ^= 1  # one flipped bit, same size
    (ck4 / "optimizer.pt").write_bytes(bytes(raw))
    with pytest.raises(AdaptError, match=rf"checkpoint {ck6} is damaged \(trainable.safetensors is {len(whole) // 2} bytes, "
                                         rf"the manifest says {len(whole)} \(truncated\?\)\); pass --resume latest"):
        find_checkpoint(root, str(ck6))
    assert find_checkpoint(root, "latest") == ck2
    assert f"checkpoint {ck4} is damaged (optimizer.pt does not match the sha256 in the manifest" in caplog.text
    result = train_run(tiny_model, concept_dir, tmp_path, resume="latest")
    assert result["steps"] == BASE["steps"] and same_weights(tmp_path / LORA, inproc_reference / LORA)
    fault("newest checkpoint truncated, the one before altered by one bit", "both named with the file and the reason; "
          "--resume latest falls back to step 2 with a warning; result bit-identical")


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tiny_model, concept_dir, inproc_reference, tmp_path, fault,
                                                              monkeypatch):
    import errno

    real, calls = torch.save, [0]

    def full_disk(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:  # optimizer.pt of the second checkpoint: a partial write, then ENOSPC
            Path(f).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(AdaptError, match=r"no space left on the device while writing \S*step-000004; nothing was replaced"):
        train_run(tiny_model, concept_dir, tmp_path)
    monkeypatch.undo()
    [kept] = list_checkpoints(tmp_path / "checkpoints")
    assert kept.name == "step-000002" and damage(kept) is None and leftovers(tmp_path / "checkpoints") == []
    result = train_run(tiny_model, concept_dir, tmp_path, resume="latest")
    assert result["steps"] == BASE["steps"] and same_weights(tmp_path / LORA, inproc_reference / LORA)
    fault("disk full while writing a checkpoint", "one-line error; the partial checkpoint removed, the previous one "
          "verifies; --resume latest gives the bit-identical result")


# --- 4. hostile or broken files --------------------------------------------------------------------

KEY = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora"


def header_only(path, entry, data_bytes):
    """A safetensors file whose header says what `entry` says, followed by `data_bytes` zero bytes."""
    import struct

    raw = json.dumps({f"{KEY}.down.weight": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_bytes)
    return path


def png_header(path, width, height):
    """A PNG that declares width x height pixels (the pixel data is never reached)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def hostile_case(kind, tmp, model, concept_dir, monkeypatch):
    """(argv, expected error text) for one kind of hostile or broken file."""
    from safetensors.torch import save_file

    gen = ["generate", "x", "--model", str(model), "--steps", "1", "--output", str(tmp / "out")]
    lora = ["lora", "--token", "<sks>", "--model", str(model), "--steps", "1", "--output", str(tmp / "run")]
    down, up = f"{KEY}.down.weight", f"{KEY}.up.weight"
    if kind == "safetensors header declaring a 40 GB tensor":
        f = header_only(tmp / "huge.safetensors", {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 16]}, 16)
        return [*gen, "--lora", str(f)], r"declares shape \[100000, 100000\] F32 \(40.0 GB\) but spans 16 bytes"
    if kind == "safetensors offsets past the end of the file":
        f = header_only(tmp / "short.safetensors", {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}, 16)
        return [*gen, "--lora", str(f)], r"ends at byte 512 but the file holds 16 bytes of data \(truncated"
    if kind == "LoRA whose A and B ranks disagree":
        save_file({down: torch.randn(4, 32), up: torch.randn(32, 8)}, str(tmp / "ranks.safetensors"))
        return [*gen, "--lora", str(tmp / "ranks.safetensors")], r"down \(A\) weight \[4, 32\] and up \(B\) weight \[32, 8\]"
    if kind == "NaN-filled LoRA":
        save_file({down: torch.full((4, 32), float("nan")), up: torch.randn(32, 4)}, str(tmp / "nan.safetensors"))
        return [*gen, "--lora", str(tmp / "nan.safetensors")], "holds NaN or inf values"
    if kind == "inf-filled embedding":
        save_file({"<bad>": torch.full((1, 32), float("inf"))}, str(tmp / "inf.safetensors"))
        return [*gen, "--embedding", str(tmp / "inf.safetensors")], r"embedding file .*inf.safetensors: .*holds NaN or inf"
    if kind.startswith("model folder"):
        evil = tmp / "evil"
        shutil.copytree(model, evil)
        if "auto_map" in kind:
            config = json.loads((evil / "text_encoder" / "config.json").read_text())
            (evil / "text_encoder" / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "evil.M"}}))
            return [*gen[:2], "--model", str(evil), *gen[4:]], r"asks to run its own code \(text_encoder/config.json has auto_map"
        index = json.loads((evil / "model_index.json").read_text())
        (evil / "model_index.json").write_text(json.dumps({**index, "unet": ["evil_unet", "EvilUNet"]}))
        (evil / "unet" / "evil_unet.py").write_text(f"open({str(tmp / 'ran')!r}, 'w')\n")
        return [*gen[:2], "--model", str(evil), *gen[4:]], r"loads unet from the module 'evil_unet' shipped with the model"
    images = tmp / "images"
    shutil.copytree(concept_dir, images)
    if kind == "10 MB caption file":
        (images / "img0.txt").write_text("a photo of {token} " * 500_000 + " " * 500_000)
        return [*lora, "--images", str(images)], r"caption file .*img0.txt is 10.0 MB; a caption is a sentence"
    if kind == "image that decodes to 2.5 gigapixels":
        png_header(images / "bomb.png", 50_000, 50_000)
        return [*lora, "--images", str(images)], r"cannot read image .*bomb.png \(.*2500000000 pixels"
    # between PIL's warning and error thresholds PIL decodes (with a warning): refused on the header too
    monkeypatch.setattr("PIL.Image.MAX_IMAGE_PIXELS", 500)
    return [*lora, "--images", str(images)], r"cannot read image .*img0.png \(24x24 pixels, above PIL's decompression-bomb limit"


HOSTILE = ["safetensors header declaring a 40 GB tensor", "safetensors offsets past the end of the file",
           "LoRA whose A and B ranks disagree", "NaN-filled LoRA", "inf-filled embedding",
           "model folder whose text encoder config has auto_map", "model folder loading a component from its own .py",
           "10 MB caption file", "image that decodes to 2.5 gigapixels", "image between PIL's bomb warning and error"]


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_or_broken_file_is_a_one_line_error(kind, tiny_model, concept_dir, tmp_path, fault, monkeypatch):
    import resource

    argv, expected = hostile_case(kind, tmp_path, tiny_model, concept_dir, monkeypatch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CliRunner().invoke(app, argv)
    grew_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert re.search(expected, errors[0]), errors[0]
    assert grew_mb < 300 and not (tmp_path / "ran").exists()  # nothing large allocated, no code from the file ran
    assert not (tmp_path / "out").exists() and not (tmp_path / "run" / LORA).exists()
    line = errors[0][len("error: "):].replace(f"{tmp_path}/", "")
    fault(kind, f"exit 2, one line: {line[:120]}{'...' if len(line) > 120 else ''}")
