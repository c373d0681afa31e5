"""`adapt extract` (a LoRA from a fine-tuned folder minus its base) and `adapt resize` (a LoRA to a
lower rank): both are truncated SVDs, so both are checked against known low-rank updates."""

from __future__ import annotations

import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from adapt.infer import generate, load_pipeline
from adapt.loras import Lora, read_lora, write_lora
from conftest import run

PROMPT = "a photo of <sks>"
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"
TEXT_FILE = "text_encoder/model.safetensors"


def _perturb(folder, file, pattern, rank, seed, scale=0.5) -> dict:
    """Add a random rank-`rank` update to every weight of `file` whose name matches `pattern`;
    returns {module key: the update as stored (tuned - base, in fp32)}."""
    path = folder / file
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors, g, deltas = load_file(str(path)), torch.Generator().manual_seed(seed), {}
    component = file.split("/")[0]
    for name, w in sorted(tensors.items()):
        if re.search(pattern, name):
            d = torch.randn(w.shape[0], rank, generator=g) @ torch.randn(rank, w.shape[1], generator=g)
            tensors[name] = w + scale * d / math.sqrt(w.shape[1])
            deltas[f"{component}.{name.removeprefix('text_model.').removesuffix('.weight')}"] = tensors[name] - w
    save_file(tensors, str(path), metadata=meta)
    return deltas


@pytest.fixture(scope="module")
def tuned(tiny_model, tmp_path_factory):
    """The tiny model with a known rank-2 update on every attention q and v projection, nothing else."""
    folder = tmp_path_factory.mktemp("tuned") / "model"
    shutil.copytree(tiny_model, folder)
    return folder, _perturb(folder, UNET_FILE, r"attn[12]\.to_[qv]\.weight$", 2, seed=0)


def _images(model, loras=()):
    pipe = load_pipeline(str(model), "euler", loras=list(loras))
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(pipe, [PROMPT] * 2, [0, 1], steps=4)])


def _plain_images(model, lora=None):
    from diffusers import StableDiffusionPipeline

    from adapt.schedulers import make_scheduler

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = make_scheduler("euler", pipe.scheduler.config)
    if lora is not None:
        pipe.load_lora_weights(str(lora))
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    images = pipe([PROMPT] * 2, num_inference_steps=4, generator=gens).images
    return np.stack([np.asarray(i, dtype=np.int16) for i in images]), pipe


def _error(approx: dict, exact: dict) -> float:
    """sqrt(sum ||approx - exact||^2 / sum ||exact||^2) over the modules of `exact` (missing: zero)."""
    num = sum(float(((approx[k].delta() if k in approx else 0) - d).double().pow(2).sum()) for k, d in exact.items())
    return math.sqrt(num / sum(float(d.double().pow(2).sum()) for d in exact.values()))


def test_extract_recovers_a_known_low_rank_delta_and_prints_its_errors(tiny_model, tuned, tmp_path):
    folder, deltas = tuned
    out = tmp_path / "r2.safetensors"
    code, log = run("extract", "--model", folder, "--base", tiny_model, "--rank", 2, "--output", out)
    assert code == 0, log
    lora, meta = read_lora(out)
    assert lora.keys() == deltas.keys()  # k and out did not change: left out
    assert all(lo.rank == 2 and torch.allclose(lo.delta(), deltas[k], atol=1e-6) for k, lo in lora.items())
    assert f"{len(deltas)} of {2 * len(deltas)} targeted modules changed" in log and "hold 100.0% of the unet's change" in log
    with safe_open(str(out), "pt") as f:
        assert all(k.startswith("unet.") for k in f.keys())  # a .safetensors --output: diffusers layout by default
    assert json.loads(meta["adapt.extract"])["rank"] == 2

    # rank 1 keeps the larger singular value of each module: the error the spectra give, as printed
    s = {k: torch.linalg.svdvals(d.double()) for k, d in deltas.items()}
    expected = math.sqrt(sum(float((v[1:] ** 2).sum()) for v in s.values()) / sum(float((v ** 2).sum()) for v in s.values()))
    assert 0.1 < expected < 0.9
    assert re.search(rf"^ +1  +{expected:.6f} ", log, re.M)  # rank 2's row in the table: error 0
    assert re.search(r"^ +2\* +0\.000000  +1\.000000$", log, re.M)
    one = tmp_path / "r1.safetensors"
    code, log = run("extract", "--model", folder, "--base", tiny_model, "--rank", 1, "--output", one)
    assert code == 0, log
    assert _error(read_lora(one)[0], deltas) == pytest.approx(expected, rel=1e-4)
    assert f"relative error {expected:.6f}" in log


def test_extracted_lora_on_the_base_draws_what_the_tuned_model_draws(tiny_model, tuned, tmp_path):
    folder, deltas = tuned
    out = tmp_path / "cat-r4"  # a folder: both files a LoRA run writes
    code, log = run("extract", "--model", folder, "--base", tiny_model, "--rank", 4, "--output", out)
    assert code == 0, log
    diffusers_file, kohya_file = out / "pytorch_lora_weights.safetensors", out / "cat-r4.safetensors"
    with safe_open(str(kohya_file), "pt") as f:
        assert all(k.startswith("lora_unet_") for k in f.keys())

    want = _images(folder)
    assert np.abs(want - _images(tiny_model)).max() > 20  # the update shows in the images
    for file in (diffusers_file, kohya_file):
        assert np.abs(_images(tiny_model, [(str(file), 1.0)]) - want).max() <= 1

    plain_want, tuned_pipe = _plain_images(folder)
    for lora in (out, kohya_file):  # diffusers' own loader: the run folder, and the kohya file
        images, pipe = _plain_images(tiny_model, lora)
        assert np.abs(images - plain_want).max() <= 1
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, target = dict(pipe.unet.named_parameters()), dict(tuned_pipe.unet.named_parameters())
    for key in deltas:
        name = key.removeprefix("unet.") + ".weight"
        assert torch.allclose(fused[name], target[name], atol=1e-5), name


def test_extract_targets_text_encoder_and_the_share_of_the_change(tiny_model, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    attn = _perturb(folder, UNET_FILE, r"attn1\.to_k\.weight$", 1, seed=1)
    ff = _perturb(folder, UNET_FILE, r"ff\.net\.2\.weight$", 1, seed=2)
    text = _perturb(folder, TEXT_FILE, r"self_attn\.q_proj\.weight$", 1, seed=3)
    energy = {k: float(d.double().pow(2).sum()) for k, d in {**attn, **ff}.items()}
    share = 100 * sum(energy[k] for k in attn) / sum(energy.values())

    out = tmp_path / "a.safetensors"
    with caplog.at_level("WARNING", logger="adapt"):
        code, log = run("extract", "--model", folder, "--base", tiny_model, "--rank", 1, "--output", out)
    assert code == 0, log
    assert f"hold {share:.1f}% of the unet's change" in log and 0 < share < 100
    assert "text_encoder" in caplog.text and "--text-encoder" in caplog.text
    assert read_lora(out)[0].keys() == attn.keys()

    out = tmp_path / "b.safetensors"
    code, log = run("extract", "--model", folder, "--base", tiny_model, "--rank", 1, "--targets", "ff.net.2,q",
                    "--text-encoder", "--output", out, "--format", "kohya")
    assert code == 0, log
    lora = read_lora(out)[0]
    assert lora.keys() == ff.keys() | text.keys()  # q of the UNet did not change; q of the text encoder did
    assert all(torch.allclose(lora[k].delta(), d, atol=1e-6) for k, d in {**ff, **text}.items())


def _lora_file(path, keys_shapes: dict, rank: int, true_ranks, alpha: float, fmt="diffusers", seed=0) -> dict:
    """A LoRA of stored rank `rank` whose module i has true rank true_ranks[i % len]; returns its modules."""
    g, loras = torch.Generator().manual_seed(seed), {}
    for i, (key, (out_dim, in_dim)) in enumerate(sorted(keys_shapes.items())):
        t = true_ranks[i % len(true_ranks)]
        up = torch.randn(out_dim, t, generator=g) @ torch.randn(t, rank, generator=g) / rank
        loras[key] = Lora(torch.randn(rank, in_dim, generator=g) / math.sqrt(in_dim), up, alpha)
    write_lora(path, loras, fmt)
    return loras


def test_resize_to_rank_4_is_the_best_rank_4_approximation(tuned, tmp_path):
    _, deltas = tuned
    shapes = {k: tuple(d.shape) for k, d in deltas.items()}
    for fmt in ("diffusers", "kohya"):
        src = tmp_path / f"r8-{fmt}.safetensors"
        loras = _lora_file(src, shapes, 8, [8], alpha=4.0, fmt=fmt)
        out = tmp_path / f"r4-{fmt}.safetensors"
        code, log = run("resize", src, "--rank", 4, "--output", out)
        assert code == 0, log
        resized = read_lora(out)[0]
        best = {}
        for k, lo in loras.items():
            u, s, vh = torch.linalg.svd(lo.delta().double())
            best[k] = (u[:, :4] * s[:4]) @ vh[:4]
            assert resized[k].rank == 4 and torch.allclose(resized[k].delta().double(), best[k], atol=1e-5), k
        err = _error(resized, {k: lo.delta() for k, lo in loras.items()})
        assert 0.1 < err < 0.9 and f"relative error ||dW - dW_r|| / ||dW|| = {err:.6f}" in log and "ranks 8 -> 4" in log
        with safe_open(str(out), "pt") as f:  # the input's layout
            assert all(k.startswith("lora_unet_" if fmt == "kohya" else "unet.") for k in f.keys())
        assert out.stat().st_size < src.stat().st_size and f"-> {out.stat().st_size / 1024:.1f} KiB" in log


def test_resize_by_energy_finds_each_modules_true_rank_and_loads_in_diffusers(tiny_model, tuned, tmp_path):
    _, deltas = tuned
    shapes = {k: tuple(d.shape) for k, d in deltas.items()}
    src = tmp_path / "r8.safetensors"
    loras = _lora_file(src, shapes, 8, [2, 1, 3], alpha=8.0)
    true = {k: int(torch.linalg.matrix_rank(lo.delta())) for k, lo in loras.items()}
    assert set(true.values()) == {1, 2, 3}
    code, log = run("resize", src, "--energy", 0.999, "--output", tmp_path / "e")
    assert code == 0, log
    assert "ranks 8 -> 1..3 (median 2)" in log and "relative error ||dW - dW_r|| / ||dW|| = 0.000000" in log
    for file in (tmp_path / "e" / "pytorch_lora_weights.safetensors", tmp_path / "e" / "e.safetensors"):
        resized = read_lora(file)[0]
        assert {k: lo.rank for k, lo in resized.items()} == true
        assert all(torch.allclose(resized[k].delta(), lo.delta(), atol=1e-5) for k, lo in loras.items())
    with safe_open(str(tmp_path / "e" / "pytorch_lora_weights.safetensors"), "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 2 and set(config["unet.rank_pattern"].values()) == {1, 3}

    # per-module ranks load in plain diffusers (rank_pattern; kohya: from the shapes) and in adapt
    want, _ = _plain_images(tiny_model, src)
    for lora in (tmp_path / "e", tmp_path / "e" / "e.safetensors"):
        assert np.abs(_plain_images(tiny_model, lora)[0] - want).max() <= 1
    assert np.abs(_images(tiny_model, [(str(tmp_path / "e" / "e.safetensors"), 1.0)]) - want).max() <= 1

    capped = tmp_path / "capped.safetensors"
    code, log = run("resize", src, "--energy", 0.999, "--rank", 2, "--output", capped)
    assert code == 0 and {lo.rank for lo in read_lora(capped)[0].values()} == {1, 2}


def test_extract_and_resize_errors(tiny_model, tuned, tmp_path):
    folder, _ = tuned
    lora = tmp_path / "x.safetensors"
    assert run("extract", "--model", folder, "--base", tiny_model, "--rank", 2, "--output", lora)[0] == 0

    def error(*args):
        code, log = run(*args)
        assert code == 2 and "Traceback" not in log and len(log.strip().splitlines()) == 1, log
        return log

    assert "does not exist" in error("extract", "--model", tmp_path / "missing", "--output", tmp_path / "o")
    assert "--rank must be >= 1" in error("extract", "--model", folder, "--rank", 0)
    assert "--format both writes two files" in error("extract", "--model", folder, "--format", "both", "--output", tmp_path / "o.safetensors")
    assert "choose one of: both, diffusers, kohya" in error("extract", "--model", folder, "--format", "ckpt")
    assert "already exists" in error("extract", "--model", folder, "--base", tiny_model, "--output", lora)
    assert "names no module" in error("extract", "--model", folder, "--base", tiny_model, "--targets", "to_x", "--output", tmp_path / "o")
    assert "differs from --base" in error("extract", "--model", tiny_model, "--base", tiny_model, "--output", tmp_path / "o")
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    tensors = load_file(str(other / UNET_FILE))
    name = next(k for k in sorted(tensors) if k.endswith("attn1.to_q.weight"))
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, str(other / UNET_FILE))
    assert "not the same architecture" in error("extract", "--model", other, "--base", tiny_model, "--output", tmp_path / "o")
    assert not (tmp_path / "o").exists()

    out = tmp_path / "y.safetensors"
    assert "pass --rank R or --energy F" in error("resize", lora, "--output", out)
    assert "--rank must be >= 1" in error("resize", lora, "--rank", 0, "--output", out)
    for bad in ("0", "1.5"):
        assert "--energy must be in (0, 1]" in error("resize", lora, "--energy", bad, "--output", out)
    assert "not found" in error("resize", tmp_path / "missing.safetensors", "--rank", 1, "--output", out)
    assert "fit no module" in error("resize", tiny_model / UNET_FILE, "--rank", 1, "--output", out)
    assert "already exists" in error("resize", lora, "--rank", 1, "--output", lora)
    assert not out.exists()
