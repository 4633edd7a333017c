"""Presets match unisd-method.md section 2."""

from __future__ import annotations

import pytest

from unisd_components.config import TrainingConfig
from unisd_components.presets import PRESET_TRAINING_OVERRIDES, PRESETS, training_for_preset


def test_unisd_star():
    v = PRESETS["unisd_star"]
    assert v.method == "sdft" and v.alpha == 0.0
    assert v.enabled_components() == ("agreement", "contrastive", "ema", "feature_matching")
    assert (v.agreement.level, v.agreement.k, v.agreement.strategy, v.agreement.gamma) == (
        "token",
        3,
        "retrieval",
        1.0,
    )
    assert (v.contrastive.weight, v.contrastive.margin) == (0.1, 0.5)
    assert (v.ema.beta, v.ema.sync_steps) == (0.9, 10)
    assert v.feature_matching.weight == 0.1 and not v.feature_matching.match_repr
    assert v.clipping is None


def test_unisd_star_paper():
    v = PRESETS["unisd_star_paper"]
    assert v.enabled_components() == ("agreement", "contrastive", "ema", "feature_matching")
    assert (v.agreement.k, v.agreement.strategy, v.agreement.gamma) == (3, "retrieval", 0.001)
    assert (v.contrastive.weight, v.contrastive.margin) == (0.01, 0.1)
    assert (v.ema.beta, v.ema.sync_steps) == (0.98, 10)
    assert v.feature_matching.weight == 0.01
    assert PRESET_TRAINING_OVERRIDES["unisd_star_paper"] == {"batch_size_factor": 0.5}


def test_training_for_preset_halves_the_paper_batch_only():
    training = TrainingConfig(batch_size=4)
    assert training_for_preset("unisd_star_paper", training).batch_size == 2
    assert training_for_preset("unisd_star", training).batch_size == 4
    assert training_for_preset("unisd_star_paper", TrainingConfig(batch_size=1)).batch_size == 1
    with pytest.raises(KeyError):
        training_for_preset("nope", training)
