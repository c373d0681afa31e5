"""Input safety: odd image modes are converted, corrupt and tiny images are one-line errors,
pickle files only with --allow-pickle, unknown names list the valid ones, no unsafe loading in
the package, saved files honour the umask."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from adapt.data import check_images, instance_examples
from adapt.errors import AdaptError
from adapt.images import load_rgb
from conftest import run

ROOT = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"


def _image_modes(folder: Path) -> dict[str, Path]:
    folder.mkdir()
    paths = {}
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (8, 8, 24, 24))
    for mode, img in {
        "RGBA": rgba, "LA": rgba.convert("LA"), "P": rgba.convert("P"), "L": rgba.convert("L"),
        "CMYK": Image.new("CMYK", (32, 32), (0, 255, 255, 0)),  # red
        "I16": Image.fromarray(np.full((32, 32), 65535, dtype=np.uint16)),
    }.items():
        ext = "jpg" if mode == "CMYK" else "png"
        img.save(folder / f"{mode}.{ext}")
        paths[mode] = folder / f"{mode}.{ext}"
    return paths


def test_image_modes_are_converted_not_rejected(tmp_path):
    paths = _image_modes(tmp_path / "modes")
    for mode, path in paths.items():
        img = load_rgb(path)
        assert img.mode == "RGB" and img.size == (32, 32), mode
    corner = {m: load_rgb(p).getpixel((0, 0)) for m, p in paths.items()}
    assert corner["RGBA"] == corner["LA"] == (255, 255, 255)  # transparency composited on white
    assert load_rgb(paths["RGBA"]).getpixel((16, 16)) == (0, 0, 255)
    assert corner["I16"] == (255, 255, 255)  # 16-bit white stays white (scaled, not clipped)
    r, g, b = corner["CMYK"]
    assert r > 200 and g < 60 and b < 60
    # EXIF orientation: a 20x10 image tagged "rotate 90" is read as 10x20
    img = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif)
    assert load_rgb(tmp_path / "rot.jpg").size == (10, 20)


def test_corrupt_and_small_images(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(folder / "small.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    examples = instance_examples(folder, "<sks>", "a photo of {token}")
    with pytest.raises(AdaptError, match=r"cannot read image .*broken.png.*--skip-bad-images"):
        check_images(examples, 16)
    kept = check_images(examples, 16, skip_bad=True)
    assert [e.image.name for e in kept] == ["small.png"]
    assert "skipping unreadable image" in caplog.text and "smaller than the training resolution 16: upscaled" in caplog.text
    (folder / "small.png").unlink()
    with pytest.raises(AdaptError, match="none of the images could be read"):
        check_images(instance_examples(folder, "<sks>", "x"), 16, skip_bad=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    code, log = run("lora", "--images", empty, "--token", "<sks>")
    assert code == 2 and "no images" in log


def test_pickle_files_only_with_allow_pickle(tiny_model, tmp_path, caplog):
    from adapt.infer import load_pipeline

    emb = tmp_path / "style.pt"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 32)}, "name": "<my-style>"}, emb)
    with pytest.raises(AdaptError, match="pickle file.*--allow-pickle"):
        load_pipeline(str(tiny_model), "euler", embeddings=[(str(emb), None)])
    pipe = load_pipeline(str(tiny_model), "euler", embeddings=[(str(emb), None)], allow_pickle=True)
    assert "--allow-pickle: reading pickle file" in caplog.text
    assert "<my-style>_1" in pipe.tokenizer.get_vocab()

    lora = tmp_path / "lora.bin"
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"
    torch.save({key: torch.randn(2, 32), key.replace(".lora.down.", ".lora.up."): torch.randn(32, 2)}, lora)
    code, log = run("generate", "x", "--model", tiny_model, "--lora", lora, "--steps", "1", "--output", tmp_path / "g")
    assert code == 2 and "--allow-pickle" in log
    code, log = run("generate", "x", "--model", tiny_model, "--lora", lora, "--steps", "1", "--allow-pickle",
                    "--output", tmp_path / "g")
    assert code == 0, log

    evil = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "obj": Path("/etc")}, evil)  # an arbitrary object: refused even with the flag
    with pytest.raises(AdaptError, match="tensors-only pickle"):
        load_pipeline(str(tiny_model), "euler", embeddings=[(str(evil), None)], allow_pickle=True)


def test_unknown_names_list_the_valid_ones(concept_dir):
    from adapt.cli import app as cli_app

    result = CliRunner().invoke(cli_app, ["finetune"])
    assert result.exit_code == 2 and "choose one of: lora, dreambooth, textual-inversion" in result.output
    for argv, valid in [(["--format", "ckpt"], "diffusers, kohya"), (["--lr-scheduler", "step"], "constant"),
                        (["--mixed-precision", "fp8"], "auto, no, fp16, bf16")]:
        code, log = run("lora", "--images", concept_dir, "--token", "<sks>", *argv)
        assert code == 2 and valid in log, log


def test_no_unsafe_loading_or_evaluation_in_the_package():
    for path in (ROOT / "adapt").rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"(?<![.\w])(eval|exec)\(", text), path  # builtins, not module.eval()
        assert "pickle.load" not in text, path


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_saved_files_honour_the_umask(tiny_model, tmp_path, mask):
    """safetensors replaces the file it writes with a 0600 one; what appears gets the umask's modes,
    so a UI running as another user (or a shared models folder) can read it."""
    from adapt.formats import save_fused_pipeline
    from adapt.infer import load_pipeline
    from adapt.loras import Lora, write_lora
    from adapt.embeddings import save_embedding

    pipe = load_pipeline(str(tiny_model), "euler", device="cpu", dtype=torch.float32)
    old = os.umask(mask)
    try:
        files = [write_lora(tmp_path / "lora.safetensors", {"unet.conv_in": Lora(torch.ones(1, 4, 3, 3), torch.ones(32, 1, 1, 1), 1.0)}),
                 *save_embedding({"text_encoder": torch.zeros(1, 32)}, "<tok>", tmp_path / "ti", {}, ("diffusers", "a1111"))]
        folder = save_fused_pipeline(pipe, tiny_model, tmp_path / "model", {})
    finally:
        os.umask(old)
    files += [p for p in folder.rglob("*") if p.is_file()]
    assert len(files) > 10 and any(p.suffix == ".safetensors" for p in folder.rglob("*"))
    assert {p.relative_to(tmp_path).as_posix(): oct(p.stat().st_mode & 0o777) for p in files} == \
        {p.relative_to(tmp_path).as_posix(): oct(0o666 & ~mask) for p in files}
    assert {oct(p.stat().st_mode & 0o777) for p in [folder, *folder.rglob("*")] if p.is_dir()} == {oct(0o777 & ~mask)}
