"""Pivotal tuning (`adapt lora --pivotal`): the LoRA and the token's new embedding learn together in the
one loop; only they change; the embedding stops at its fraction of the steps, exactly on resume too; the
files carry both (the kohya file bundles the embedding as A1111 reads it) and `generate --lora FILE`
reproduces the trained model."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.embeddings import read_embedding
from adapt.errors import AdaptError
from adapt.infer import generate, load_pipeline
from adapt.loras import read_lora
from adapt.methods.pivotal import PivotalMethod
from adapt.models import assemble_pipeline, load_components
from adapt.schedulers import make_scheduler
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

TOKEN = "<disc>"
PROMPT = f"a photo of {TOKEN}"
LORA = "pytorch_lora_weights.safetensors"
EMBEDS = "learned_embeds.safetensors"
ADAPTERS = ("lora_A", "lora_B")


def _method(steps, **lora):
    cfg = LoraConfig(pivotal=True, init_token="cat", num_vectors=2, **lora)
    return PivotalMethod(cfg, TOKEN, steps)


def _examples(concept_dir):
    return instance_examples(concept_dir, TOKEN, "a photo of {token}")


def _base_state(module) -> dict:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
            if not any(a in k for a in ADAPTERS)}


def _probe(pipe):
    """UNet output for fixed inputs and the text encoder's output for PROMPT (its token expanded as the
    pipeline expands it)."""
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    prompt = pipe.maybe_convert_prompt(PROMPT, pipe.tokenizer)
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 700]), hidden).sample, pipe.text_encoder(ids)[0]


def _images(pipe):
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(pipe, [PROMPT] * 2, [0, 1], steps=4)])


@pytest.fixture(scope="module")
def trained(tiny_model, concept_dir, tmp_path_factory):
    """(run folder, base weights before, components after, the trained model's probe and images, method)."""
    out = tmp_path_factory.mktemp("pivotal") / "run"
    c = load_components(tiny_model)
    before = {n: _base_state(getattr(c, n)) for n in ("unet", "text_encoder")}
    method = _method(12, targets="q,k,v,out", train_text_encoder=True)
    train(c, method, _examples(concept_dir), TrainConfig(steps=12, lr=3e-2, embedding_lr=5e-2, cache_latents=False),
          out, resolution=16, progress=False, recipe={"method": "lora"})
    c.unet.eval(), c.text_encoder.eval()
    pipe = assemble_pipeline(False, {"vae": c.vae, "unet": c.unet, "text_encoder": c.text_encoder, "tokenizer": c.tokenizer,
                                     "scheduler": make_scheduler("euler", c.noise_scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return out, before, c, _probe(pipe), _images(pipe), method


def test_only_the_lora_and_the_new_rows_train(tiny_model, trained):
    _, before, c, _, _, method = trained
    emb_key = "embeddings.token_embedding.weight"
    for name, state in before.items():
        after = _base_state(getattr(c, name))
        for k, v in state.items():
            if k.endswith(emb_key):
                n_old = v.shape[0]
                assert after[k].shape[0] == n_old + 2 and method.ti.ids == [n_old, n_old + 1]
                assert torch.equal(after[k][:n_old], v), "an old word's embedding row changed"
                cat = v[c.tokenizer.convert_tokens_to_ids("cat</w>")]
                assert all(not torch.allclose(after[k][i], cat) for i in method.ti.ids)  # both new rows learned
            else:
                assert torch.equal(after[k], v), f"base weight {name}.{k} changed"
    trainable = {n for m in ("unet", "text_encoder") for n, p in getattr(c, m).named_parameters() if p.requires_grad}
    assert trainable and all(any(a in n for a in ADAPTERS) or n.endswith(emb_key) for n in trainable)
    assert any("encoder.layers" in n for n in trainable)  # --train-text-encoder's LoRA trains too
    layers = [m for mod in (c.unet, c.text_encoder) for m in mod.modules() if hasattr(m, "get_delta_weight")]
    assert layers and all(m.get_delta_weight("default").abs().max() > 0 for m in layers)  # each adapter learned


def test_both_files_carry_the_embedding(trained):
    out, _, c, _, _, method = trained
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted([LORA, EMBEDS, "run.safetensors"])
    learned = method.ti.learned(c)["text_encoder"]
    assert torch.equal(load_file(str(out / EMBEDS))[TOKEN], learned) and learned.shape == (2, 32)
    with safe_open(str(out / LORA), "pt") as f:
        assert f.metadata()["adapt.embedding"] == EMBEDS and not any(k.startswith("bundle_emb") for k in f.keys())
    kohya = load_file(str(out / "run.safetensors"))
    bundled = {k: v for k, v in kohya.items() if k.startswith("bundle_emb.")}
    assert list(bundled) == [f"bundle_emb.{TOKEN}.string_to_param.*"]  # A1111's key: <name>.string_to_param.*
    assert torch.equal(bundled[f"bundle_emb.{TOKEN}.string_to_param.*"], learned)
    assert any(k.startswith("lora_te_") for k in kohya) and any(k.startswith("lora_unet_") for k in kohya)
    assert json.loads((out / "recipe.json").read_text()) == {"method": "lora"}


def test_generate_with_either_file_reproduces_the_trained_model(tiny_model, trained):
    out, _, _, (unet_ref, text_ref), images_ref, _ = trained
    base = load_pipeline(str(tiny_model), "euler")
    assert not torch.allclose(_probe(base)[0], unet_ref, atol=1e-3)
    for file in (LORA, "run.safetensors"):
        pipe = load_pipeline(str(tiny_model), "euler", loras=[(str(out / file), 1.0)])
        unet_out, text_out = _probe(pipe)
        assert torch.allclose(unet_out, unet_ref, atol=1e-5) and torch.allclose(text_out, text_ref, atol=1e-5), file
        assert np.abs(_images(pipe) - images_ref).max() <= 1, file
    # weight 0: the LoRA adds nothing (the UNet is the base's, bit for bit); the token's embedding still loads
    zero = load_pipeline(str(tiny_model), "euler", loras=[(str(out / LORA), 0.0)])
    assert torch.equal(_probe(zero)[0], _probe(base)[0])
    assert TOKEN in zero.tokenizer.get_vocab() and f"{TOKEN}_1" in zero.tokenizer.get_vocab()


def test_plain_diffusers_loads_the_lora_and_the_embedding_beside_it(tiny_model, trained):
    from diffusers import StableDiffusionPipeline

    out, _, _, (unet_ref, text_ref), images_ref, _ = trained
    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = make_scheduler("euler", plain.scheduler.config)
    plain.set_progress_bar_config(disable=True)
    plain.load_lora_weights(str(out))
    plain.load_textual_inversion(str(out / EMBEDS))
    unet_out, text_out = _probe(plain)
    assert torch.allclose(unet_out, unet_ref, atol=1e-5) and torch.allclose(text_out, text_ref, atol=1e-5)


def test_a_diffusers_file_without_its_embedding_is_a_clear_error(tiny_model, trained, tmp_path):
    out = trained[0]
    shutil.copy(out / LORA, tmp_path / LORA)
    with pytest.raises(AdaptError, match=f"{EMBEDS}, which is not beside it"):
        load_pipeline(str(tiny_model), "euler", loras=[(str(tmp_path / LORA), 1.0)])


def test_lora_tools_leave_the_bundled_embedding_out_with_a_warning(trained, caplog):
    out = trained[0]
    with caplog.at_level("WARNING", logger="adapt"):
        modules, _ = read_lora(out / "run.safetensors")
    assert modules and all(k.startswith(("unet.", "text_encoder.")) for k in modules)
    assert f"left out its bundled embedding(s) {TOKEN}" in caplog.text


def _record(method):
    """Per optimizer step: (the new rows, one LoRA matrix of the UNet), after the method's after_step."""
    history, after_step = [], method.after_step

    def record(components):
        after_step(components)
        lora = next(p for n, p in components.unet.named_parameters() if "lora_B" in n)  # added when the run starts
        history.append((method.ti.learned(components)["text_encoder"].clone(), lora.detach().clone()))

    method.after_step = record
    return history


def test_the_embedding_stops_after_its_fraction_and_resume_across_the_stop_is_exact(tiny_model, concept_dir, tmp_path):
    """6 steps, fraction 0.5: the embedding learns in steps 1-3 and stays as it is in 4-6 while the LoRA goes on.
    Runs resumed from the checkpoints before (step 2) and after (step 4) the stop save the same files, bit for bit."""
    cfg = dict(steps=6, lr=3e-2, embedding_lr=5e-2, checkpoint_every=2)
    c = load_components(tiny_model)
    method = _method(6, embedding_steps_fraction=0.5)
    assert method.group_steps() == {"embedding": 3}
    history = _record(method)
    full = train(c, method, _examples(concept_dir), TrainConfig(**cfg), tmp_path / "a", resolution=16, progress=False)
    rows, loras = [h[0] for h in history], [h[1] for h in history]
    assert all(not torch.equal(rows[i], rows[i + 1]) for i in range(2))  # steps 2 and 3 moved it
    assert all(torch.equal(rows[2], r) for r in rows[3:])  # from step 4 on: exactly as it was after step 3
    assert all(not torch.equal(loras[i], loras[i + 1]) for i in range(5))  # the LoRA learns all run
    for step in (2, 4):
        ckpt = tmp_path / "a" / "checkpoints" / f"step-{step:06d}"
        shutil.copytree(ckpt, tmp_path / f"r{step}" / "checkpoints" / ckpt.name)
        resumed = train(load_components(tiny_model), _method(6, embedding_steps_fraction=0.5), _examples(concept_dir),
                        TrainConfig(**cfg, resume="latest"), tmp_path / f"r{step}", resolution=16, progress=False)
        assert resumed["losses"] == full["losses"]
        for name in (LORA, EMBEDS, f"r{step}.safetensors"):
            a, b = load_file(str(tmp_path / "a" / ("a.safetensors" if name.startswith("r") else name))), \
                load_file(str(tmp_path / f"r{step}" / name))
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, name)


def test_cli_pivotal_run_options_and_errors(tiny_model, concept_dir, tmp_path):
    common = ["--images", concept_dir, "--token", TOKEN, "--model", tiny_model, "--steps", "2"]
    code, log = run("lora", *common, "--pivotal", "--output", tmp_path / "x")
    assert code == 2 and "pivotal tuning needs --init-token WORD" in log and "--init-token flat" in log
    code, log = run("lora", *common, "--init-token", "cat", "--output", tmp_path / "x")
    assert code == 2 and "are for pivotal tuning; add --pivotal" in log
    code, log = run("lora", *common, "--pivotal", "--init-token", "cat", "--embedding-steps-fraction", "0")
    assert code == 2 and "--embedding-steps-fraction in (0, 1]" in log
    code, log = run("lora", *["--images", concept_dir, "--token", "<a.b>", "--model", tiny_model], "--pivotal",
                    "--init-token", "cat")
    assert code == 2 and "A1111 cannot read" in log
    recipe = tmp_path / "db.toml"
    recipe.write_text("[lora]\npivotal = true\ninit_token = 'cat'\n")
    code, log = run("dreambooth", *common, "--lora", "--recipe", recipe, "--no-prior-preservation")
    assert code == 2 and "is for `adapt lora --pivotal`" in log
    code, log = run("lora", *common, "--pivotal", "--init-token", "cat", "--embedding-lr", "0.05",
                    "--embedding-steps-fraction", "0.5", "--format", "kohya", "--output", tmp_path / "ok")
    assert code == 0, log
    recipe = json.loads((tmp_path / "ok" / "recipe.json").read_text())
    assert recipe["method"] == "lora" and recipe["lora"]["pivotal"] and recipe["train"]["embedding_lr"] == 0.05
    assert sorted(p.name for p in (tmp_path / "ok").glob("*.safetensors")) == [EMBEDS, "ok.safetensors"]
    code, log = run("lora", *common, "--pivotal", "--init-token", "cat", "--dry-run")
    assert code == 0 and "[lora] pivotal = True" in log and "peak memory" in log


def test_sdxl_bundles_clip_l_and_clip_g(concept_dir, tmp_path):
    from adapt.models import build_tiny_sdxl_pipeline

    sdxl = build_tiny_sdxl_pipeline(tmp_path / "sdxl")
    code, log = run("lora", "--images", concept_dir, "--token", TOKEN, "--model", sdxl, "--steps", "2", "--pivotal",
                    "--init-token", "cat", "--embedding-lr", "0.05", "--output", tmp_path / "x")
    assert code == 0, log
    kohya = load_file(str(tmp_path / "x" / "x.safetensors"))
    bundled = {k: tuple(v.shape) for k, v in kohya.items() if k.startswith("bundle_emb.")}
    token, emb = read_embedding(tmp_path / "x" / EMBEDS)
    assert token == TOKEN and bundled == {f"bundle_emb.{TOKEN}.clip_l": tuple(emb["text_encoder"].shape),
                                          f"bundle_emb.{TOKEN}.clip_g": tuple(emb["text_encoder_2"].shape)}
    images = [generate(load_pipeline(str(sdxl), "euler", loras=[(str(tmp_path / "x" / f), 1.0)]), [PROMPT], [0], steps=2)[0]
              for f in (LORA, "x.safetensors")]
    assert np.abs(np.asarray(images[0], dtype=np.int16) - np.asarray(images[1], dtype=np.int16)).max() <= 1


def test_pivotal_starts_from_lora_alones_seeded_init(tiny_model):
    """Adding the token draws nothing from the seeded generator, so at one --seed pivotal tuning's LoRA starts
    where LoRA alone's does (and the data order and noise have generators of their own): a comparison of the two
    at one seed is then paired, differing by what the embedding learns, not by another LoRA init."""
    from accelerate.utils import set_seed

    from adapt.methods.lora import LoraMethod

    def lora_init(method):
        c = load_components(tiny_model)
        set_seed(0)
        method.prepare(c)
        return {k: v.detach().clone() for k, v in c.unet.named_parameters() if "lora_" in k}

    alone = lora_init(LoraMethod(LoraConfig()))
    pivotal = lora_init(PivotalMethod(LoraConfig(pivotal=True, init_token=TOKEN, num_vectors=3), TOKEN, 3))
    assert alone.keys() == pivotal.keys() and alone
    assert all(torch.equal(alone[k], pivotal[k]) for k in alone)


def test_the_embedding_learns_at_a_twentieth_of_lr_unless_told(tiny_model, concept_dir, tmp_path):
    from adapt.methods.pivotal import EMBEDDING_LR_FRACTION
    from adapt.plan import make_plan

    def train_cfg(**kw):
        options = {"images": concept_dir, "token": TOKEN, "output": tmp_path / "run", "model": tiny_model, "pivotal": True,
                   "init_token": "cat", **kw}
        return make_plan("lora", options).configs["train"]

    assert EMBEDDING_LR_FRACTION == 1 / 20
    assert train_cfg(lr=4e-3).embedding_lr == pytest.approx(2e-4)
    assert train_cfg(lr=4e-3, embedding_lr=5e-3).embedding_lr == 5e-3
    assert train_cfg(optimizer="prodigy").embedding_lr is None  # prodigy's --lr multiplies its estimate: no ratio
    plain = make_plan("lora", {"images": concept_dir, "token": TOKEN, "output": tmp_path / "run2", "model": tiny_model})
    assert plain.configs["train"].embedding_lr is None
