"""The loss of one batch: the UNet's prediction against the epsilon / velocity target, per element
(mse, huber, smooth-l1), masked, averaged per sample, min-SNR weighted and summed with the samples'
loss weights. train.py's loop and validation.py's held-out loss both call `diffusion_loss`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from .errors import AdaptError


def diffusion_loss(unet, noise_scheduler, latents, encoder_hidden_states, loss_weight, noise, timesteps, *,
                   added_cond_kwargs=None, snr_gamma=None, mask=None, loss="mse", huber_delta=0.1,
                   huber_schedule="constant"):
    """Weighted per-sample MSE between the UNet's prediction and the epsilon / velocity target;
    with snr_gamma, each sample's MSE is also weighted by min-SNR (min(SNR, gamma) / SNR for
    epsilon, / (SNR + 1) for v-prediction; diffusers' compute_snr). A `mask` [B, 1, h, w] weights
    the per-element loss before its mean (as kohya's apply_masked_loss: not renormalised by the
    mask's area); None leaves it as it is. `loss`: see elementwise_loss."""
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise AdaptError(f"the model's scheduler uses prediction_type={kind!r}; adapt trains 'epsilon' and 'v_prediction' models")
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                      return_dict=False)[0]
    delta = None if loss == "mse" else huber_deltas(noise_scheduler, timesteps, huber_delta, huber_schedule)
    elementwise = elementwise_loss(model_pred.float(), target.float(), loss, delta)
    if mask is not None:
        elementwise = elementwise * mask.to(elementwise.device)
    per_sample = elementwise.mean(dim=(1, 2, 3))
    if snr_gamma is not None:
        snr = compute_snr(noise_scheduler, timesteps).float()
        clipped = torch.minimum(snr, torch.full_like(snr, snr_gamma))
        per_sample = per_sample * (clipped / (snr + 1) if kind == "v_prediction" else clipped / snr)
    return (per_sample * loss_weight.to(per_sample.device)).sum()


def elementwise_loss(pred, target, kind: str, delta=None):
    """mse: (pred - target)^2 (F.mse_loss). With d = pred - target and c = delta per sample, as
    kohya's conditional_loss: huber (pseudo-Huber) 2c(sqrt(d^2 + c^2) - c), about d^2 for |d| << c
    and 2c|d| beyond; smooth-l1 2(sqrt(d^2 + c^2) - c), about d^2 / c, then 2|d|."""
    if kind == "mse":
        return F.mse_loss(pred, target, reduction="none")
    c = delta.to(pred.device, pred.dtype).view(-1, *[1] * (pred.dim() - 1))
    smooth = torch.sqrt((pred - target) ** 2 + c ** 2) - c
    return 2 * c * smooth if kind == "huber" else 2 * smooth


def huber_deltas(noise_scheduler, timesteps, delta: float, schedule: str):
    """The huber / smooth-l1 delta per sample (kohya's huber_schedule): constant; exponential,
    delta ** (t / T) (1 at t = 0, delta at t = T); snr, (1 - delta) / (1 + sigma_t)^2 + delta with
    sigma_t = sqrt((1 - alphabar_t) / alphabar_t) (near 1 for small t, near delta for large t)."""
    t = timesteps.float().cpu()
    if schedule == "constant":
        return torch.full_like(t, delta)
    if schedule == "exponential":
        return torch.exp(math.log(delta) * t / noise_scheduler.config.num_train_timesteps)
    ab = noise_scheduler.alphas_cumprod[timesteps.cpu()].float()
    return (1 - delta) / (1 + ((1 - ab) / ab) ** 0.5) ** 2 + delta
