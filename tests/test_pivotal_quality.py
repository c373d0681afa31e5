"""Pivotal tuning on the bundled base (issue 17): what it learns on examples/cat against LoRA alone and
textual inversion alone at the same steps, by eval's distance (slow: three 150-step runs, 16 images each)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# 150 steps of each, LoRA at the model's lr (4e-3), pivotal's embedding at its default (lr / 20), textual inversion's
# at 5e-3, both from --init-token flat (examples/cat/README.md: what the cats have to teach is Twemoji's flat style);
# 16 seeds, DPM++ 2M Karras, 25 steps, guidance 3; eval's distance (adapt/metrics.py distance_to_set: mean L2 in its
# 16x16 feature space to the nearest examples/cat image; lower = closer); benchmarks/pivotal_sweep.py's `distance`.
# Measured at training seed 0: LoRA alone 7.149, textual inversion 7.382, pivotal 6.656. Over training seeds 0-15
# (README, "Pivotal tuning") pivotal is closer than LoRA alone at every seed, by 0.59 on average, and than textual
# inversion at each of seeds 0-3. The win is the starting word's (README): LoRA alone with --token flat is as close, at
# 750 steps LoRA alone catches up and is closer, and from --init-token cat, the class word the captions already hold,
# pivotal is even with LoRA alone.


@pytest.fixture(scope="module")  # the two tests read the same runs
def distances() -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from pivotal_sweep import distance  # the README's sweep measures with the same function

    runs = {"lora": "lora", "ti": "ti:5e-3:flat", "pivotal": "piv:default:1:flat"}
    return {name: distance(run, 150) for name, run in runs.items()}


@pytest.mark.slow
def test_pivotal_tuning_beats_textual_inversion_alone_at_the_same_steps(distances):
    assert distances["pivotal"] < distances["ti"] - 0.25, distances  # measured 6.656 vs 7.382


@pytest.mark.slow
def test_pivotal_tuning_beats_lora_alone_at_the_same_steps(distances):
    assert distances["pivotal"] < distances["lora"] - 0.25, distances  # measured 6.656 vs 7.149 (seeds 0-15: closer at each, by 0.006-1.467)
