"""Textual inversion: only the new embedding rows learn; files load in plain diffusers with the
same images; token errors are clear."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from adapt.data import instance_examples
from adapt.errors import AdaptError
from adapt.infer import generate, load_pipeline
from adapt.config import TextualInversionConfig
from adapt.embeddings import read_embedding
from adapt.methods.textual_inversion import TEMPLATES, TextualInversionMethod, expand_prompt
from adapt.models import load_components
from conftest import run

TOKEN = "<disc-toy>"


@pytest.fixture(scope="module")
def ti_run(tiny_model, concept_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "run"
    code, log = run("textual-inversion", "--images", concept_dir, "--token", TOKEN, "--init-token", "cat",
                    "--num-vectors", "2", "--model", tiny_model, "--steps", "4", "--lr", "5e-2",
                    "--format", "a1111", "--output", out)
    assert code == 0, log
    return out


def test_only_the_new_rows_train(tiny_model, ti_run):
    from safetensors.torch import load_file

    from adapt.data import Example
    from adapt.train import train
    from adapt.train_config import TrainConfig

    base = load_components(tiny_model)
    learned = load_file(str(ti_run / "learned_embeds.safetensors"))
    assert list(learned) == [TOKEN] and learned[TOKEN].shape == (2, 32)
    init = base.text_encoder.get_input_embeddings().weight[base.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert not torch.allclose(learned[TOKEN][0], init)  # it moved away from the init token

    # Run the method in-process to look at every parameter after training.
    c = load_components(tiny_model)
    before = {k: v.clone() for k, v in c.text_encoder.state_dict().items()}
    unet_before = {k: v.clone() for k, v in c.unet.state_dict().items()}
    method = TextualInversionMethod(TextualInversionConfig(init_token="cat", num_vectors=2), TOKEN)
    img = next(Path(json.loads((ti_run / "recipe.json").read_text())["data"]["images"]).glob("*.png"))
    examples = [Example(img, f"an emoji of {TOKEN}")]
    train(c, method, examples, TrainConfig(steps=3, lr=5e-2, cache_text=False), ti_run.parent / "inproc",
          resolution=16, progress=False)
    after = c.text_encoder.state_dict()
    emb_key = next(k for k in before if k.endswith("token_embedding.weight"))
    for k, v in before.items():
        if k != emb_key:
            assert torch.equal(after[k], v), k
    n_old = before[emb_key].shape[0]
    assert after[emb_key].shape[0] == n_old + 2 and method.ids == [n_old, n_old + 1]
    assert torch.equal(after[emb_key][:n_old], before[emb_key])  # every old row, bit for bit
    cat = before[emb_key][c.tokenizer.convert_tokens_to_ids("cat</w>")]
    assert not torch.allclose(after[emb_key][n_old], cat) and not torch.allclose(after[emb_key][n_old + 1], cat)
    assert all(torch.equal(c.unet.state_dict()[k], v) for k, v in unet_before.items())


def test_embedding_gives_the_same_images_as_plain_diffusers(tiny_model, ti_run):
    from diffusers import StableDiffusionPipeline

    from adapt.schedulers import make_scheduler

    prompt = f"a photo of {TOKEN}"
    ours = generate(load_pipeline(str(tiny_model), "euler", embeddings=[(str(ti_run / "learned_embeds.safetensors"), None)]),
                    [prompt], [3], steps=4)
    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    plain.scheduler = make_scheduler("euler", plain.scheduler.config)
    plain.load_textual_inversion(str(ti_run / "learned_embeds.safetensors"))
    theirs = plain(prompt, num_inference_steps=4, generator=[torch.Generator().manual_seed(3)]).images
    assert np.array_equal(np.asarray(ours[0]), np.asarray(theirs[0]))

    # the A1111/ComfyUI file (named as its prompt word in those UIs) under a new name gives the same images
    a1111 = ti_run / "disc-toy.safetensors"
    assert sorted(p.name for p in ti_run.glob("*.safetensors")) == ["disc-toy.safetensors", "learned_embeds.safetensors"]
    token, emb = read_embedding(a1111)
    assert token == TOKEN and emb.shape == (2, 32)
    renamed = generate(load_pipeline(str(tiny_model), "euler", embeddings=[(str(a1111), "<other>")]),
                       ["a photo of <other>"], [3], steps=4)
    assert np.array_equal(np.asarray(ours[0]), np.asarray(renamed[0]))
    # the token matters: without the embedding the image differs
    base = generate(load_pipeline(str(tiny_model), "euler"), [prompt], [3], steps=4)
    assert not np.array_equal(np.asarray(ours[0]), np.asarray(base[0]))


def test_generate_cli_with_embedding(tiny_model, ti_run, tmp_path):
    code, log = run("generate", f"a photo of {TOKEN}", "--model", tiny_model, "--steps", "2",
                    "--embedding", ti_run / "learned_embeds.safetensors", "--output", tmp_path / "g")
    assert code == 0, log
    assert json.loads((tmp_path / "g" / "generation.json").read_text())["embeddings"][0]["token"] is None
    code, log = run("generate", "x", "--model", tiny_model, "--embedding", tmp_path / "missing.safetensors")
    assert code == 2 and "not found" in log


def test_token_errors(tiny_model, concept_dir, tmp_path):
    common = ["--images", concept_dir, "--model", tiny_model, "--steps", "1", "--output", tmp_path / "o"]
    code, log = run("textual-inversion", *common, "--token", "cat", "--init-token", "dog")
    assert code == 2 and "already exists in the vocabulary" in log
    code, log = run("textual-inversion", *common, "--token", "<new>", "--init-token", "xylophonistically")
    assert code == 2 and "--init-token 'xylophonistically' is" in log and "single existing word" in log
    code, log = run("textual-inversion", *common, "--token", "<new>")
    assert code == 2 and "needs --init-token" in log
    code, log = run("textual-inversion", *common, "--token", "<new>", "--init-token", "cat", "--property", "mood")
    assert code == 2 and "choose one of: object, style" in log


def test_prompts_templates_and_scale_lr(tiny_model, concept_dir, tmp_path):
    assert expand_prompt(f"a {TOKEN} on a mat", TOKEN, 3) == f"a {TOKEN} {TOKEN}_1 {TOKEN}_2 on a mat"
    assert expand_prompt(f"a {TOKEN}x", TOKEN, 3) == f"a {TOKEN}x"  # whole words only
    examples = instance_examples(concept_dir, TOKEN, TEMPLATES["style"])
    assert len(examples) == 3 * len(TEMPLATES["style"]) and all(TOKEN in e.prompt for e in examples)
    out = tmp_path / "s"
    code, log = run("textual-inversion", "--images", concept_dir, "--token", TOKEN, "--init-token", "cat",
                    "--model", tiny_model, "--steps", "1", "--batch-size", "2", "--grad-accum", "2",
                    "--scale-lr", "--property", "style", "--output", out)
    assert code == 0, log
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["train"]["lr"] == pytest.approx(5e-3 * 4) and recipe["textual_inversion"]["property"] == "style"


def test_embedding_for_another_model_is_a_clear_error(tiny_model, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"<x>": torch.zeros(1, 768)}, str(bad))
    with pytest.raises(AdaptError, match="cannot be loaded"):
        load_pipeline(str(tiny_model), "euler", embeddings=[(str(bad), None)])


def test_a1111_file_is_named_as_its_prompt_word(tmp_path, caplog):
    from safetensors.torch import load_file

    from adapt.embeddings import save_embedding

    emb = {"text_encoder": torch.arange(64.0).reshape(2, 32)}
    with caplog.at_level("INFO", logger="adapt"):
        plain = save_embedding(emb, "sksti", tmp_path / "a", {}, ("diffusers", "a1111"))
    assert [p.relative_to(tmp_path).as_posix() for p in plain] == ["a/learned_embeds.safetensors", "a/sksti.safetensors"]
    assert "the prompt word there is sksti (ComfyUI: embedding:sksti)" in caplog.text
    # a token that would take the diffusers file's name: its own folder, both files intact
    clash = save_embedding(emb, "learned_embeds", tmp_path / "b", {}, ("diffusers", "a1111"))
    assert [p.relative_to(tmp_path).as_posix() for p in clash] == ["b/learned_embeds.safetensors",
                                                                   "b/a1111/learned_embeds.safetensors"]
    assert list(load_file(str(clash[0]))) == ["learned_embeds"] and list(load_file(str(clash[1]))) == ["emb_params"]
    assert read_embedding(clash[1])[0] == "learned_embeds"


def test_a_phrase_of_n_tokens_starts_n_vectors_from_its_pieces(tiny_model, tmp_path):
    """--init-token "<new>" --num-vectors 3: the token's rows start from its own pieces < new >, so the text
    encoder sees exactly what it saw before the token was a word (pivotal tuning then starts where LoRA alone does)."""
    c = load_components(tiny_model)

    def encode(prompt):
        ids = c.tokenizer(prompt, padding="max_length", max_length=c.tokenizer.model_max_length, return_tensors="pt").input_ids
        with torch.no_grad():
            return c.text_encoder(ids)[0], ids

    before, old_ids = encode("a photo of <new> cat")
    method = TextualInversionMethod(TextualInversionConfig(init_token="<new>", num_vectors=3), "<new>")
    method.prepare(c)
    after, new_ids = encode(method.prompt("a photo of <new> cat"))
    assert not torch.equal(old_ids, new_ids) and set(method.ids) <= set(new_ids[0].tolist())  # the new words are in it
    assert torch.equal(before, after)
    c = load_components(tiny_model)
    with pytest.raises(AdaptError, match=r"--init-token '<new>' is 3 tokens .*--num-vectors 3"):
        TextualInversionMethod(TextualInversionConfig(init_token="<new>", num_vectors=2), "<new>").prepare(c)
