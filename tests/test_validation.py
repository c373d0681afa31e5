"""The validation loss (--validation-split / --validation-images, --keep-best): a seeded disjoint
split, fixed draws, training untouched by it, metrics rows, the kept best checkpoint across a
resume, and one-line argument errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import adapt.launch
import adapt.train
import adapt.validation
from adapt.config import LoraConfig
from adapt.data import Example, instance_examples
from adapt.errors import AdaptError
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.run import setup
from adapt.train import chunk_loss, train
from adapt.train_config import TrainConfig
from adapt.validation import MIN_SAMPLES, measure, split
from conftest import make_concept_images, run

LORA = "pytorch_lora_weights.safetensors"


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_split_is_seeded_disjoint_and_holds_out_whole_images():
    examples = [Example(Path(f"img{i}.png"), f"prompt {k}") for i in range(6) for k in range(3)]  # 3 templates each
    kept, held = split(examples, 0.34, seed=5)
    assert (kept, held) == split(examples, 0.34, seed=5)
    assert len({ex.image for ex in held}) == 2 and len(held) == 6  # round(0.34 x 6) images, with all their examples
    assert not {ex.image for ex in kept} & {ex.image for ex in held} and len(kept) + len(held) == len(examples)
    assert len({frozenset(ex.image for ex in split(examples, 0.34, seed=s)[1]) for s in range(8)}) > 1  # the seed decides
    assert len({ex.image for ex in split(examples, 0.01, seed=0)[1]}) == 1  # at least one
    with pytest.raises(AdaptError, match="holds out 1 of 1 image.*leaving none to train on"):
        split(examples[:3], 0.1, seed=0)


def test_training_is_bit_identical_with_and_without_validation(tiny_model, concept_dir, tmp_path):
    """The held-out set has its own generator and is scored without gradients in eval mode: the
    same training examples give the same losses and the same weights, bit for bit."""
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    kept, held = split(examples, 0.34, seed=0)
    cfg = dict(steps=4, batch_size=2, lr=1e-2, caption_dropout=0.3, checkpoint_every=3, validation_every=3)
    a = train(load_components(tiny_model), LoraMethod(LoraConfig()), kept, TrainConfig(**cfg), tmp_path / "plain",
              resolution=16, random_flip=True, progress=False)
    b = train(load_components(tiny_model), LoraMethod(LoraConfig()), kept, TrainConfig(**cfg, validation_split=0.34),
              tmp_path / "val", resolution=16, random_flip=True, progress=False, validation=held)
    assert a["losses"] == b["losses"]
    wa, wb = load_file(str(tmp_path / "plain" / LORA)), load_file(str(tmp_path / "val" / LORA))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # val_loss on the --validation-every steps and the last one, beside that step's training loss
    assert [r["step"] for r in rows(tmp_path / "val") if "val_loss" in r] == [3, 4]
    assert all("val_loss" not in r for r in rows(tmp_path / "plain"))
    summary = json.loads((tmp_path / "val" / "validation.json").read_text())
    assert summary["held_out"] == [str(held[0].image)] and summary["best_step"] in (3, 4)
    assert f"at step {summary['best_step']}" in (tmp_path / "val" / "report.md").read_text()


def test_validation_loss_uses_the_same_draws_every_time(tiny_model, concept_dir, tmp_path):
    examples = instance_examples(concept_dir, "<sks>", "a photo of {token}")
    kept, held = split(examples, 0.34, seed=0)

    def new_run(folder):
        return setup(load_components(tiny_model), LoraMethod(LoraConfig()), kept, TrainConfig(steps=3), tmp_path / folder,
                     resolution=16, random_flip=True, bucket_step=None, recipe=None, progress=False, validation=held)

    r = new_run("a")
    v = r.validation
    assert len(v.batch) == MIN_SAMPLES and {ex.image for ex in v.batch} == {held[0].image}
    T = r.components.noise_scheduler.config.num_train_timesteps
    ts = [int(s[2]) for s in v.samples]
    assert ts == sorted(ts) and ts[0] < T / MIN_SAMPLES and ts[-1] > T - T / MIN_SAMPLES  # spread over the schedule
    rng = {k: g.get_state() for k, g in r.generators.items()}, torch.get_rng_state()
    first = measure(r, chunk_loss, force=True)
    assert measure(r, chunk_loss, force=True) == first  # the same draws
    assert measure(new_run("b"), chunk_loss, force=True) == first  # drawn from --seed, not from the run so far
    after = {k: g.get_state() for k, g in r.generators.items()}, torch.get_rng_state()
    assert all(torch.equal(rng[0][k], after[0][k]) for k in rng[0]) and torch.equal(rng[1], after[1])
    assert all(m.training for m in r.modules)  # back in training mode
    with torch.no_grad():
        next(p for n, p in r.components.unet.named_parameters() if "lora_B" in n).add_(0.5)
    assert measure(r, chunk_loss, force=True) != first  # it scores the trained weights


def test_keep_best_keeps_the_lowest_checkpoint_through_pruning_and_resume(tiny_model, concept_dir, tmp_path, monkeypatch):
    """The measured losses are replaced by chosen ones so the best is an early step: pruning to one
    checkpoint leaves it, a resumed run finds it in the checkpoint, and a lower one replaces it."""
    chosen = {1: 0.9, 2: 0.2, 3: 0.5, 4: 0.6, 5: 0.7, 6: 0.1, 7: 0.8, 8: 0.3}
    real = adapt.train.measure

    def chosen_measure(run, loss_fn, force=False):
        if real(run, loss_fn, force) is None:
            return None
        run.validation.losses[run.step] = chosen[run.step]
        return chosen[run.step]

    monkeypatch.setattr(adapt.train, "measure", chosen_measure)
    monkeypatch.setattr(adapt.validation, "MIN_SAMPLES", 1)  # its losses are replaced: score one draw, quickly
    kept, held = split(instance_examples(concept_dir, "<sks>", "a photo of {token}"), 0.34, seed=0)
    cfg = dict(lr=1e-2, checkpoint_every=1, keep_checkpoints=1, keep_best=True, validation_split=0.34)
    out = tmp_path / "run"

    def go(steps, **kw):
        return train(load_components(tiny_model), LoraMethod(LoraConfig()), kept, TrainConfig(steps=steps, **cfg, **kw),
                     out, resolution=16, recipe={"r": 1}, progress=False, validation=held)

    def checkpoints():
        return sorted(p.name for p in (out / "checkpoints").iterdir())

    r = go(4)
    assert checkpoints() == ["step-000002", "step-000003"]  # the best and the newest (none at the last step)
    assert [row.get("val_loss") for row in rows(out)] == [0.9, 0.2, 0.5, 0.6]  # --keep-best: at every checkpoint
    assert (r["validation"]["best_step"], r["validation"]["best_checkpoint"]) == (2, "checkpoints/step-000002")
    go(6, resume="latest")  # from step 3: steps 4 and 5 are worse than step 2, which stays
    assert checkpoints() == ["step-000002", "step-000005"]
    r = go(8, resume="latest")  # from step 5: step 6 is lower, so step 2 goes
    assert checkpoints() == ["step-000006", "step-000007"]
    assert [row.get("val_loss") for row in rows(out)] == [chosen[s] for s in range(1, 9)]
    summary = json.loads((out / "validation.json").read_text())
    assert summary == r["validation"]
    assert (summary["best_step"], summary["best_checkpoint"], summary["final_val_loss"]) == (6, "checkpoints/step-000006", 0.3)


def test_cli_holds_out_images_and_logs_val_loss(tiny_model, concept_dir, tmp_path, monkeypatch):
    """launch splits before training: the held-out images reach train() as `validation` only."""
    seen = {}
    real = adapt.launch.train

    def spy(components, method, examples, cfg, out, **kw):
        seen["train"], seen["held"] = examples, kw["validation"]
        return real(components, method, examples, cfg, out, **kw)

    monkeypatch.setattr(adapt.launch, "train", spy)
    out = tmp_path / "run"
    code, log = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", out,
                    "--steps", "4", "--lr", "1e-2", "--validation-split", "0.34", "--validation-every", "2")
    assert code == 0, log
    train_images, held_images = {ex.image for ex in seen["train"]}, {ex.image for ex in seen["held"]}
    assert len(held_images) == 1 and not train_images & held_images and len(train_images | held_images) == 3
    assert [r["step"] for r in rows(out) if "val_loss" in r] == [2, 4]
    assert "Validation loss (1 held-out image, 16 fixed draws): lowest" in (out / "report.md").read_text()
    assert json.loads((out / "validation.json").read_text())["held_out"] == [str(next(iter(held_images)))]

    folder = make_concept_images(tmp_path / "held", n=1)
    (folder / "img0.txt").write_text("a held-out photo of {token}")
    code, log = run("lora", "--images", concept_dir, "--token", "<sks>", "--model", tiny_model, "--output", tmp_path / "b",
                    "--steps", "2", "--validation-images", folder)
    assert code == 0, log
    assert len(seen["train"]) == 3 and [ex.prompt for ex in seen["held"]] == ["a held-out photo of <sks>"]


@pytest.mark.parametrize("args, message", [
    (["--keep-best"], "--keep-best needs a validation set"),
    (["--keep-best", "--validation-split", "0.3"], "--keep-best needs a validation set .* and --checkpoint-every N"),
    (["--validation-split", "1"], "--validation-split must be in \\[0, 1\\), got 1.0"),
    (["--validation-split", "0.3", "--validation-images", "."], "pass either --validation-split or --validation-images"),
    (["--validation-images", "nowhere"], "--validation-images nowhere does not exist"),
    (["--validation-images", "IMAGES"], "--validation-images .* holds training images"),
    (["--images", "ONE", "--validation-split", "0.1"], "holds out 1 of 1 image\\(s\\), leaving none to train on"),
])
def test_argument_errors_are_one_line(args, message, tiny_model, concept_dir, tmp_path):
    one = make_concept_images(tmp_path / "one", n=1)
    args = [{"IMAGES": concept_dir, "ONE": one}.get(a, a) for a in args]
    images = [] if "--images" in args else ["--images", concept_dir]
    code, log = run("lora", *images, "--token", "<sks>", "--model", tiny_model, "--output", tmp_path / "run", "--steps", "1",
                    *args)
    errors = [line for line in log.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, log
    assert re.search(message, errors[0]), errors[0]
