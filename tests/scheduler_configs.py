"""The scheduler configs the scheduler tests build from: SD 1.5's training schedule as a DDPM config, and the
shape of SD 1.5's own scheduler_config.json."""

from __future__ import annotations

import diffusers
import pytest

from adapt.schedulers import SCHEDULERS

# SD 1.5's training schedule. DDPMScheduler does not take `set_alpha_to_one` (DDIM/PNDM/LCM do);
# SD 1.5's own scheduler_config.json carries it, so it rides along as a foreign key, which
# make_scheduler must drop quietly for the classes that don't use it.
BASE = dict(
    diffusers.DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    ).config
)
BASE["set_alpha_to_one"] = False

# The shape of SD 1.5's scheduler/scheduler_config.json: a PNDM config with PNDM-only keys.
SD15_PNDM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}


def skip_if_missing_requirements(name):
    for module in SCHEDULERS[name].requires:
        pytest.importorskip(module)
