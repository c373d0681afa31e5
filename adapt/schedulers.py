"""The project's one table of samplers ("schedulers"), under the A1111/ComfyUI names users know.

Importing this module is cheap: the table names diffusers classes by string, and diffusers is only
imported by `make_scheduler`, so the CLI can list and validate names without loading torch.

Every scheduler is built from the base model's own scheduler config (its training noise schedule:
betas, number of train timesteps, prediction type, ...) plus the few settings that define the named
sampler. Those settings are stated explicitly (e.g. `use_karras_sigmas=False` for `euler`), so a
name means the same sampler whatever the base model's config happens to carry.

`tests/test_schedulers.py` checks every entry against an exact closed-form denoiser.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from adapt.errors import AdaptError
from adapt.logs import check_installed

if TYPE_CHECKING:  # pragma: no cover
    from diffusers import SchedulerMixin


@dataclass(frozen=True)
class SchedulerSpec:
    cls: str  # diffusers class name
    kwargs: dict  # settings passed to from_config (override the base config)
    stochastic: bool  # injects fresh noise each step (ancestral/SDE) -> needs the generator for determinism
    note: str  # one line: when to choose it
    requires: tuple[str, ...] = ()  # extra importable modules the diffusers class needs


DEFAULT_SCHEDULER = "dpm++2m-karras"  # generate, eval, class images and validation grids, unless told otherwise
SCHEDULERS: dict[str, SchedulerSpec] = {
    "ddpm": SchedulerSpec(
        "DDPMScheduler",
        {},
        True,
        "the original ancestral sampler; slow, wants 100-1000 steps; stochastic",
    ),
    "ddim": SchedulerSpec(
        "DDIMScheduler",
        {},
        False,
        "DDIM (eta=0); 20-50 steps; deterministic; good for inversion/img2img",
    ),
    "pndm": SchedulerSpec(
        "PNDMScheduler",
        {"skip_prk_steps": True},
        False,
        "PLMS, the SD 1.x pipeline default; ~50 steps; deterministic",
    ),
    "lms": SchedulerSpec(
        "LMSDiscreteScheduler",
        {"use_karras_sigmas": False},
        False,
        "k-LMS linear multistep; 30-50 steps; deterministic; needs scipy",
        requires=("scipy",),
    ),
    "heun": SchedulerSpec(
        "HeunDiscreteScheduler",
        {"use_karras_sigmas": False},
        False,
        "2nd-order Euler; 2 model calls per step, so ~15-30 steps; deterministic",
    ),
    "euler": SchedulerSpec(
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": False},
        False,
        "simple and robust; 20-30 steps; deterministic",
    ),
    "euler-a": SchedulerSpec(
        "EulerAncestralDiscreteScheduler",
        {},
        True,
        "'Euler a'; 20-40 steps, image keeps changing with step count; stochastic",
    ),
    "dpm++2m": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": False},
        False,
        "'DPM++ 2M'; good quality at 20-30 steps; deterministic",
    ),
    "dpm++2m-karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        False,
        "'DPM++ 2M Karras'; the usual default, 15-25 steps; deterministic",
    ),
    "dpm++2m-sde-karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
        True,
        "'DPM++ 2M SDE Karras'; detailed results at 20-30 steps; stochastic",
    ),
    "dpm2": SchedulerSpec(
        "KDPM2DiscreteScheduler",
        {"use_karras_sigmas": False},
        False,
        "'DPM2'; 2 model calls per step, ~15-30 steps; deterministic",
    ),
    "dpm2-a": SchedulerSpec(
        "KDPM2AncestralDiscreteScheduler",
        {"use_karras_sigmas": False},
        True,
        "'DPM2 a'; 2 model calls per step, ~20-30 steps; stochastic",
    ),
    "unipc": SchedulerSpec(
        "UniPCMultistepScheduler",
        {"use_karras_sigmas": False},
        False,
        "UniPC predictor-corrector; fewest steps for plain models, 10-20; deterministic",
    ),
    "lcm": SchedulerSpec(
        "LCMScheduler",
        {},
        True,
        "only for LCM-distilled models/LoRAs: 2-8 steps, guidance ~1-2; stochastic",
    ),
}


def scheduler_names() -> list[str]:
    """The valid names, in table order."""
    return list(SCHEDULERS)


def check_scheduler(name: str) -> SchedulerSpec:
    """The table entry for `name` (case and spaces ignored), or a one-line error listing the names."""
    key = name.strip().lower() if isinstance(name, str) else name
    try:
        return SCHEDULERS[key]
    except (KeyError, TypeError):
        raise AdaptError(
            f"unknown scheduler {name!r}; choose one of: {', '.join(scheduler_names())}"
        ) from None


def make_scheduler(name: str, config: Mapping[str, Any]) -> "SchedulerMixin":
    """Build scheduler `name` on top of a base pipeline's `scheduler.config` (FrozenDict or dict).

    Keys of `config` the target class does not take (e.g. `skip_prk_steps` from SD's PNDM config
    when building LCM) are dropped here rather than logged by diffusers as a warning.
    """
    spec = check_scheduler(name)
    for module in spec.requires:
        check_installed(module, f"scheduler {name!r}")

    import diffusers  # lazy: cli and config import this module before argument errors

    cls = getattr(diffusers, spec.cls)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    base = {k: v for k, v in dict(config).items() if k in accepted or k.startswith("_")}
    return cls.from_config(base, **dict(spec.kwargs))
