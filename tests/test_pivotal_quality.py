"""Pivotal tuning on the bundled base (issue 17): what it learns on examples/cat against LoRA alone and
textual inversion alone at the same steps, by eval's distance (slow: three 150-step runs, 16 images each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# 150 steps of each, LoRA at the model's lr (4e-3), pivotal's embedding at its default (lr / 20), textual inversion's
# at 5e-3, 16 seeds, DPM++ 2M Karras, 25 steps, guidance 3; eval's distance (adapt/metrics.py distance_to_set: mean L2
# in its 16x16 feature space to the nearest examples/cat image; lower = closer); benchmarks/pivotal_sweep.py's
# `distance`. Measured at training seed 0: LoRA 7.149, TI 7.917, pivotal 7.423. Over seeds 0-3 (README): pivotal
# beats TI at every seed, by 0.49-1.33; against LoRA alone it is even over seeds 0-23 (closer at 13 of 24, LoRA alone
# minus pivotal 0.080 +- 0.084). A faster-learnt embedding fits the cats better and renders closer without
# guidance, but guidance 3 multiplies its change, which only the conditional prediction sees (README, "Pivotal tuning").


@pytest.fixture(scope="module")  # the two tests read the same runs
def distances() -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pivotal_sweep import distance  # the README's sweep measures with the same function

    runs = {"lora": "lora", "ti": "ti:5e-3:cat", "pivotal": "piv:default:1:cat"}
    return {name: distance(run, 150) for name, run in runs.items()}


@pytest.mark.slow
def test_pivotal_tuning_beats_textual_inversion_alone_at_the_same_steps(distances):
    assert distances["pivotal"] < distances["ti"] - 0.25, distances  # measured 7.423 vs 7.917 (4,800-step base: 6.801 vs 7.707)


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 17's target, not met on the bundled base: over training seeds 0-23 "
                                       "(paired: the same LoRA init, data order and noise) pivotal tuning is closer at 13 "
                                       "of 24, LoRA alone's distance minus pivotal's 0.080 +- 0.084 (standard error), "
                                       "within the seeds' noise; at seed 0 LoRA alone is closer, 7.149 vs 7.423")
def test_pivotal_tuning_beats_lora_alone_at_the_same_steps(distances):
    assert distances["pivotal"] < distances["lora"], distances
