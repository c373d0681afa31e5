"""Fault injection, part 2: checkpoints that move between machines, arrive damaged or meet a full disk, and
hostile or broken files (safetensors headers, NaN weights, model folders that run code, decompression bombs).
Each ends in a clear message with nothing lost; faults_kit.py has the fault table and the subprocess helpers.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from adapt.checkpoint import damage, find_checkpoint, list_checkpoints
from adapt.cli import app
from adapt.errors import AdaptError
from faults_kit import LORA, finish, leftovers, same_weights, start

pytestmark = pytest.mark.usefixtures("fault_table", "no_process_left")


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
