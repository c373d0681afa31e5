"""LoRA variants (`--adapter dora|loha|lokr`, `--rank-stabilised`): the one loop trains only their
adapters; their files reproduce the trained model in `generate` (DoRA and rsLoRA also in plain
diffusers, LoHa/LoKr as ComfyUI and A1111 compute them); weight 0 is the base bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open

from adapt.config import LoraConfig
from adapt.data import instance_examples
from adapt.infer import generate, load_pipeline
from adapt.lora_names import from_kohya_name, module_key
from adapt.loras import read_lora
from adapt.methods.lora import LoraMethod
from adapt.models import assemble_pipeline, load_components
from adapt.schedulers import make_scheduler
from adapt.train import train
from adapt.train_config import TrainConfig
from conftest import run

PROMPT = "a photo of <sks>"
LORA = "pytorch_lora_weights.safetensors"
ADAPTER_NAMES = ("lora_", "hada_", "lokr_")
VARIANTS = {  # alpha != rank everywhere, so a reader that drops or misplaces the scale is caught
    "rslora": dict(adapter="lora", rank_stabilised=True, rank=3, alpha=2.0),  # unet only: diffusers' kohya reader needs it
    "dora": dict(adapter="dora", rank=4, alpha=2.0, train_text_encoder=True),
    "loha": dict(adapter="loha", rank=4, alpha=2.0, train_text_encoder=True),
    "lokr": dict(adapter="lokr", rank=2, alpha=3.0, train_text_encoder=True),  # r < 8/2: W2 low-rank, as in real models
}
FILES = {"rslora": {LORA, "rslora.safetensors"}, "dora": {LORA}, "loha": {"loha.safetensors"}, "lokr": {"lokr.safetensors"}}


def _base_state(module) -> dict:
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in module.state_dict().items()
            if not any(a in k for a in ADAPTER_NAMES)}


def _probe(pipe):
    """UNet and text-encoder outputs for fixed inputs: a tighter check than 8-bit images."""
    g = torch.Generator().manual_seed(0)
    x, hidden = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(x, torch.tensor([10, 700]), hidden).sample, pipe.text_encoder(ids)[0]


def _images(pipe):
    return np.stack([np.asarray(i, dtype=np.int16) for i in generate(pipe, [PROMPT] * 2, [0, 1], steps=4)])


def _load(model, file=None, weight=1.0, **kw):
    return load_pipeline(str(model), "euler", loras=[(str(file), weight)] if file else [], **kw)


@pytest.fixture(scope="module")
def trained(tiny_model, concept_dir, tmp_path_factory):
    """variant -> (run folder, base weights before training, components after, their UNet/text outputs and images)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            out = tmp_path_factory.mktemp("variants") / variant
            c = load_components(tiny_model)
            before = {n: _base_state(getattr(c, n)) for n in ("unet", "text_encoder")}
            train(c, LoraMethod(LoraConfig(targets="q,k,v,out", **VARIANTS[variant])),
                  instance_examples(concept_dir, "<sks>", "a photo of {token}"),
                  TrainConfig(steps=20, lr=3e-2, cache_latents=False, cache_text=False), out, resolution=16, progress=False)
            c.unet.eval(), c.text_encoder.eval()
            pipe = assemble_pipeline(False, {"vae": c.vae, "unet": c.unet, "text_encoder": c.text_encoder,
                                             "tokenizer": c.tokenizer,
                                             "scheduler": make_scheduler("euler", c.noise_scheduler.config)})
            pipe.set_progress_bar_config(disable=True)
            cache[variant] = out, before, c, _probe(pipe), _images(pipe)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_loop_trains_only_the_adapter(trained, variant):
    out, before, c, _, _ = trained(variant)
    for name, state in before.items():
        after = _base_state(getattr(c, name))
        assert after.keys() == state.keys()
        assert all(torch.equal(after[k], state[k]) for k in state), f"{variant}: a base weight of {name} changed"
    trainable = [n for m in ("unet", "text_encoder") for n, p in getattr(c, m).named_parameters() if p.requires_grad]
    assert trainable and all(any(a in n for a in ADAPTER_NAMES) for n in trainable)
    if variant == "dora":
        assert any("lora_magnitude_vector" in n for n in trainable)
    layers = [m for m in c.unet.modules() if hasattr(m, "get_delta_weight")]
    assert layers and all(m.get_delta_weight("default").abs().max() > 0 for m in layers)  # each adapter learned
    assert {p.name for p in out.glob("*.safetensors")} == FILES[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_saved_file_reproduces_the_trained_model_in_generate(tiny_model, trained, variant):
    out, _, _, (unet_ref, text_ref), images_ref = trained(variant)
    base = _load(tiny_model)
    assert not torch.allclose(_probe(base)[0], unet_ref, atol=1e-3)  # the adapter changes the model
    for file in sorted(out.glob("*.safetensors")):
        pipe = _load(tiny_model, file)
        unet_out, text_out = _probe(pipe)
        assert torch.allclose(unet_out, unet_ref, atol=1e-5) and torch.allclose(text_out, text_ref, atol=1e-5), file.name
        assert np.abs(_images(pipe) - images_ref).max() <= 1, file.name
        fused = _load(tiny_model, file, fuse=True)
        assert torch.allclose(_probe(fused)[0], unet_ref, atol=1e-5), file.name


@pytest.mark.parametrize("variant", VARIANTS)
def test_weight_zero_is_the_base_exactly_and_the_weight_scales_the_change(tiny_model, trained, variant):
    out, _, _, _, _ = trained(variant)
    file = next(iter(sorted(out.glob("*.safetensors"))))
    base = _load(tiny_model)
    zero = _load(tiny_model, file, 0.0)
    assert np.array_equal(_images(zero), _images(base))
    assert all(torch.equal(a, b) for a, b in zip(_probe(zero), _probe(base)))
    full, half = _load(tiny_model, file, 1.0), _load(tiny_model, file, 0.5)
    u0, u1, uh = _probe(base)[0], _probe(full)[0], _probe(half)[0]
    assert not torch.allclose(uh, u1, atol=1e-4) and not torch.allclose(uh, u0, atol=1e-4)
    if variant != "rslora":  # applied into the weights: W + w dW, the whole change scaled (ComfyUI's strength)
        w0, w1, wh = (dict(p.unet.named_parameters()) for p in (base, full, half))
        changed = [k for k in w0 if not torch.equal(w0[k], w1[k])]
        assert changed and all(k.endswith((".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight"))
                               for k in changed)
        assert all(torch.allclose(wh[k] - w0[k], 0.5 * (w1[k] - w0[k]), atol=1e-6) for k in changed)


@pytest.mark.parametrize("variant", ["rslora", "dora"])
def test_dora_and_rslora_files_load_in_plain_diffusers(tiny_model, trained, variant):
    from diffusers import StableDiffusionPipeline

    out, _, _, (unet_ref, text_ref), images_ref = trained(variant)
    for file in sorted(out.glob("*.safetensors")):  # rsLoRA: the diffusers and the kohya file
        plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
        plain.scheduler = make_scheduler("euler", plain.scheduler.config)
        plain.set_progress_bar_config(disable=True)
        plain.load_lora_weights(str(file))
        unet_out, text_out = _probe(plain)
        assert torch.allclose(unet_out, unet_ref, atol=1e-5) and torch.allclose(text_out, text_ref, atol=1e-5), file.name
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        theirs = np.stack([np.asarray(i, dtype=np.int16) for i in plain([PROMPT] * 2, num_inference_steps=4, generator=gens).images])
        assert np.abs(theirs - images_ref).max() <= 1, file.name


def _prepared(tiny_model, **lora):
    """The tiny model with fresh adapters set to random values (no training needed to check the maths)."""
    method = LoraMethod(LoraConfig(targets="q,k", train_text_encoder=True, **lora))
    c = load_components(tiny_model)
    method.prepare(c)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in method.trainable_parameters(c):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return c, method


def test_rank_stabilised_scale_is_written_as_a_plain_alpha(tiny_model, tmp_path):
    c, method = _prepared(tiny_model, rank=3, alpha=2.0, rank_stabilised=True)
    method.save(c, tmp_path / "rs", {})
    layer = next(m for m in c.unet.modules() if hasattr(m, "scaling"))
    assert math.isclose(layer.scaling["default"], 2.0 / math.sqrt(3))  # peft trained with alpha / sqrt(r)
    with safe_open(str(tmp_path / "rs" / "rs.safetensors"), "pt") as f:
        alphas = {float(f.get_tensor(k)) for k in f.keys() if k.endswith(".alpha")}
    assert len(alphas) == 1 and math.isclose(alphas.pop(), 2.0 * math.sqrt(3), rel_tol=1e-6)  # a kohya reader's alpha / r
    for file in ("rs.safetensors", LORA):
        assert all(math.isclose(lo.scale, 2.0 / math.sqrt(3), rel_tol=1e-6) for lo in read_lora(tmp_path / "rs" / file)[0].values())


def _comfyui_delta(parts: dict, shape):
    """A LyCORIS module's change as ComfyUI computes it (comfy/weight_adapter/loha.py, lokr.py; A1111's
    network_hada.py / network_lokr.py agree): LoHa alpha / w1_b rows; LoKr alpha / (the inner size of
    the low-rank factor, w2's first) only when a factor is low-rank, else 1; no alpha: 1."""
    alpha = float(parts["alpha"]) if "alpha" in parts else None
    if "hada_w1_a" in parts:
        scale = 1.0 if alpha is None else alpha / parts["hada_w1_b"].shape[0]
        d = (parts["hada_w1_a"] @ parts["hada_w1_b"]) * (parts["hada_w2_a"] @ parts["hada_w2_b"])
        return (d * scale).reshape(shape)
    dim = None
    w1 = parts.get("lokr_w1")
    if w1 is None:
        dim, w1 = parts["lokr_w1_b"].shape[0], parts["lokr_w1_a"] @ parts["lokr_w1_b"]
    w2 = parts.get("lokr_w2")
    if w2 is None:
        dim, w2 = parts["lokr_w2_b"].shape[0], parts["lokr_w2_a"] @ parts["lokr_w2_b"]
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return (torch.kron(w1, w2) * scale).reshape(shape)


@pytest.mark.parametrize("lora", [dict(adapter="loha", rank=4, alpha=3.0), dict(adapter="lokr", rank=2, alpha=3.0),
                                  dict(adapter="lokr", rank=4, alpha=3.0)], ids=["loha", "lokr-low-rank", "lokr-whole"])
def test_lycoris_file_is_what_comfyui_and_a1111_compute(tiny_model, tmp_path, lora):
    c, method = _prepared(tiny_model, **lora)
    method.save(c, tmp_path / "run", {})
    modules = {}
    with safe_open(str(tmp_path / "run" / "run.safetensors"), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            name, _, slot = k.partition(".")
            modules.setdefault(name, {})[slot] = f.get_tensor(k)
    assert meta["ss_network_module"] == "lycoris.kohya" and lora["adapter"] in meta["ss_network_args"]
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_k_proj" in modules
    peft_layers = {module_key(comp, n): m for comp in ("unet", "text_encoder")
                   for n, m in getattr(c, comp).named_modules() if hasattr(m, "get_delta_weight")}
    assert {from_kohya_name(n) for n in modules} == set(peft_layers)
    for name, parts in modules.items():
        layer = peft_layers[from_kohya_name(name)]
        expected = layer.get_delta_weight("default")
        assert torch.allclose(_comfyui_delta(parts, expected.shape), expected, atol=1e-6), name


def test_argument_errors_are_one_line(tiny_model, concept_dir, tmp_path):
    common = ["lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--steps", "1"]
    for bad, message in ((["--adapter", "lorax"], "unknown adapter 'lorax'; choose one of: lora, dora, loha, lokr"),
                         (["--adapter", "loha", "--rank-stabilised"], "--rank-stabilised is for --adapter lora or dora"),
                         (["--adapter", "dora", "--format", "kohya"], "a DoRA LoRA has no kohya file"),
                         (["--adapter", "lokr", "--format", "diffusers"], "reads no LoHa or LoKr file")):
        code, log = run(*common, "--output", tmp_path / "bad", *bad)
        assert code == 2 and message in log and "Traceback" not in log, log
        assert len(log.strip().splitlines()) == 1, log
        assert not (tmp_path / "bad").exists()


def test_merge_and_convert_refuse_variants_in_one_line_and_merge_into_model_fuses_them(tiny_model, trained, tmp_path):
    loha = str(trained("loha")[0] / "loha.safetensors")
    dora = str(trained("dora")[0] / LORA)
    for args, message in ((["convert", loha, "--to", "diffusers"], "reads no LoHa or LoKr file"),
                          (["convert", dora, "--to", "kohya"], "a DoRA LoRA has no kohya file"),
                          (["merge", "--lora", loha, "--lora", dora], "not DoRA/LoHa ones")):
        code, log = run(*args, "--output", tmp_path / "x.safetensors")
        assert code == 2 and message in log and len(log.strip().splitlines()) == 1, log
        assert not (tmp_path / "x.safetensors").exists()
    assert run("convert", loha, "--to", "kohya", "--output", tmp_path / "again.safetensors")[0] == 0  # kohya -> kohya
    assert torch.equal(_probe(_load(tiny_model, tmp_path / "again.safetensors"))[0], _probe(_load(tiny_model, loha))[0])

    code, log = run("merge", "--lora", f"{loha}:0.7", "--lora", f"{dora}:0.4", "--into-model", tmp_path / "fused",
                    "--model", tiny_model)
    assert code == 0, log
    together = load_pipeline(str(tiny_model), "euler", loras=[(dora, 0.4), (loha, 0.7)])  # the order does not matter
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(_probe(_load(tmp_path / "fused")), _probe(together)))
