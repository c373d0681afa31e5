"""adapt.schedulers' table: every sampler builds quietly from a model's config with its own settings winning,
names are case-free, an unknown or unavailable one is a clear error, and importing the table stays light."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from adapt.errors import AdaptError
from adapt.schedulers import SCHEDULERS, SchedulerSpec, make_scheduler, scheduler_names
from scheduler_configs import BASE, SD15_PNDM_CONFIG, skip_if_missing_requirements

diffusers = pytest.importorskip("diffusers")
REPO = Path(__file__).resolve().parents[1]
# diffusers feeds torch tensors to numpy in several schedulers; numpy 2 flags that on every call.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")


@pytest.mark.parametrize("config", [BASE, SD15_PNDM_CONFIG], ids=["ddpm-config", "sd15-pndm-config"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_builds_quietly_from_a_base_config(name, config):
    skip_if_missing_requirements(name)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched = make_scheduler(name, config)
    finally:
        logger.removeHandler(handler)
    assert type(sched).__name__ == SCHEDULERS[name].cls
    assert [r.getMessage() for r in records] == []
    # (DeprecationWarnings are hidden from users by default; see pytestmark)
    assert [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)] == []
    # the model's training schedule is carried over
    assert sched.config.beta_schedule == "scaled_linear"
    assert sched.config.beta_start == 0.00085 and sched.config.beta_end == 0.012


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_table_kwargs_are_real_settings_and_win_over_the_base_config(name):
    spec = SCHEDULERS[name]
    assert spec.note and "\n" not in spec.note
    skip_if_missing_requirements(name)  # without them diffusers only has a placeholder class
    cls = getattr(diffusers, spec.cls)
    accepted = set(inspect.signature(cls.__init__).parameters)
    # from_config silently ignores a misspelt kwarg, so check the spelling here
    assert set(spec.kwargs) <= accepted, set(spec.kwargs) - accepted
    # a base config that carries another sampler's settings must not leak into this one
    config = {**BASE, "use_karras_sigmas": True, "algorithm_type": "sde-dpmsolver", "solver_order": 3}
    sched = make_scheduler(name, config)
    for key, value in spec.kwargs.items():
        assert sched.config[key] == value, key


def test_names_and_case():
    assert scheduler_names() == list(SCHEDULERS)
    assert len(set(scheduler_names())) == len(SCHEDULERS) == 14
    assert all(isinstance(v, SchedulerSpec) for v in SCHEDULERS.values())
    assert type(make_scheduler(" Euler-A ", BASE)).__name__ == "EulerAncestralDiscreteScheduler"


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(AdaptError) as info:
        make_scheduler("dpm++3m", BASE)
    msg = str(info.value)
    assert "unknown scheduler 'dpm++3m'" in msg
    assert "choose one of: " + ", ".join(scheduler_names()) in msg


def test_missing_extra_dependency_is_an_adapt_error(monkeypatch):
    if importlib.util.find_spec("scipy") is None:
        with pytest.raises(AdaptError, match=r"pip install scipy"):
            make_scheduler("lms", BASE)
    spec = dataclasses.replace(SCHEDULERS["lms"], requires=("adapt_no_such_module",))
    monkeypatch.setitem(SCHEDULERS, "lms", spec)
    with pytest.raises(AdaptError, match=r"pip install adapt_no_such_module"):
        make_scheduler("lms", BASE)


def test_import_is_light():
    code = (
        "import adapt.schedulers, sys; "
        "heavy = [m for m in ('torch', 'diffusers') if m in sys.modules]; "
        "assert not heavy, heavy; "
        "assert len(adapt.schedulers.scheduler_names()) == 14"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
