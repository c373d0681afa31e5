"""Masked loss (issue 18): a mask per image (alpha channel with --mask-from-alpha, or
`name.mask.png`) weights the per-element loss in latent space; images without one train as before."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from adapt.config import LoraConfig
from adapt.data import instance_examples, list_images
from adapt.errors import AdaptError
from adapt.masks import batch_mask, latent_masks, mask_file
from adapt.methods.lora import LoraMethod
from adapt.models import load_components
from adapt.train import diffusion_loss, train
from adapt.train_config import TrainConfig


class PixelUnet(torch.nn.Module):
    """A stand-in UNet that predicts one learned tensor whatever its input: what it learns at each
    latent position is visible directly."""

    def __init__(self, shape):
        super().__init__()
        self.pred = torch.nn.Parameter(torch.zeros(shape))

    def forward(self, noisy, t, hidden, added_cond_kwargs=None, return_dict=False):
        return (self.pred.expand_as(noisy),)


def _learn(noise, mask, steps=20):
    sched = SimpleNamespace(config=SimpleNamespace(prediction_type="epsilon"), add_noise=lambda x, n, t: x + n)
    unet = PixelUnet(noise.shape[1:])
    opt = torch.optim.AdamW(unet.parameters(), lr=0.1, weight_decay=0.0)
    for _ in range(steps):
        loss = diffusion_loss(unet, sched, torch.zeros_like(noise), None, torch.full((len(noise),), 1 / len(noise)), noise,
                              torch.zeros(len(noise), dtype=torch.long), mask=mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return unet.pred.detach(), loss


def test_a_masked_out_region_does_not_change_what_is_learned_there():
    torch.manual_seed(0)
    mask = torch.ones(2, 1, 4, 4)
    mask[:, :, :, :2] = 0  # the left half is masked out
    a = torch.randn(2, 4, 4, 4)
    b = a.clone()
    b[..., :2] = torch.randn(2, 4, 4, 2) * 10  # differs only inside the masked-out region
    learned_a, loss_a = _learn(a, mask)
    learned_b, loss_b = _learn(b, mask)
    assert torch.equal(learned_a, learned_b) and torch.equal(loss_a, loss_b)  # bit-identical
    assert torch.equal(learned_a[..., :2], torch.zeros_like(learned_a[..., :2]))  # nothing learned there
    assert not torch.equal(_learn(a, None)[0], _learn(b, None)[0])
    # the masked loss by hand (the first step's prediction is 0): sum_i w_i * mean(mask * (0 - target)^2)
    assert torch.allclose(_learn(a, mask, steps=1)[1], 0.5 * (mask * a ** 2).mean(dim=(1, 2, 3)).sum())


def test_masks_from_alpha_and_files_at_the_latent_size(concept_dir, tmp_path):
    images = list_images(concept_dir)
    sizes = {i: (16, 24) for i in images}
    masks = latent_masks(images, sizes, 8, from_alpha=True)
    m = masks[images[0]]  # a disc on a transparent background
    assert m.shape == (1, 3, 2) and m.min() >= 0 and m.max() <= 1 and m.mean() < 1
    assert latent_masks(images, sizes, 8, from_alpha=False) == {}  # no mask files: none
    folder = tmp_path / "imgs"
    shutil.copytree(concept_dir, folder)
    left = Image.new("L", (24, 24), 255)
    left.paste(0, (0, 0, 12, 24))
    left.save(mask_file(folder / "img0.png"))
    assert [p.name for p in list_images(folder)] == ["img0.png", "img1.png", "img2.png"]  # the mask is not an image
    masks = latent_masks(list_images(folder), {i: (24, 24) for i in list_images(folder)}, 8, from_alpha=False)
    assert list(masks) == [folder / "img0.png"] and masks[folder / "img0.png"].tolist() == [[[0.0, 0.5, 1.0]] * 3]
    flipped = batch_mask(masks, [folder / "img0.png", folder / "img1.png"], [True, False], (4, 3, 3))
    assert flipped.tolist() == [[[[1.0, 0.5, 0.0]] * 3], [[[1.0] * 3] * 3]]
    assert batch_mask(masks, [folder / "img1.png"], [False], (4, 3, 3)) is None
    Image.new("L", (8, 8), 255).save(mask_file(folder / "img1.png"))
    with pytest.raises(AdaptError, match="mask .*img1.mask.png is 8x8 but its image is 24x24"):
        latent_masks([folder / "img1.png"], sizes, 8, from_alpha=False)


def test_no_mask_trains_as_before_and_a_white_mask_changes_nothing(tiny_model, concept_dir, tmp_path):
    white = tmp_path / "white"
    shutil.copytree(concept_dir, white)
    for image in list_images(concept_dir):
        Image.new("L", (24, 24), 255).save(mask_file(white / image.name))

    def losses(folder, **kw):
        return train(load_components(tiny_model), LoraMethod(LoraConfig()), instance_examples(folder, "<sks>", "x"),
                     TrainConfig(steps=3, batch_size=2, lr=1e-2), tmp_path / "out" / f"{folder.name}{len(kw)}",
                     resolution=16, random_flip=True, progress=False, **kw)["losses"]

    plain = losses(concept_dir)
    assert losses(white) == plain  # a mask of ones is exactly no mask
    assert losses(concept_dir, mask_from_alpha=True) != plain
