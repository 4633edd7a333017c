"""Named UniSD* variants (unisd-method.md section 2): a preset is data, not special code.

- ``unisd_star``: token-level retrieval agreement (K=3, gamma=1), contrastive (lambda_c=0.1, margin 0.5),
  EMA teacher (beta=0.9, sync 10), feature matching (lambda_f=0.1), forward KL; no clipping.
- ``unisd_star_paper``: the paper's released recipe: gamma=0.001, lambda_c=0.01, margin 0.1, beta=0.98,
  sync 10, lambda_f=0.01, and half the per-device batch. The batch is a training setting, not part of the
  variant, so it lives in :data:`PRESET_TRAINING_OVERRIDES`; apply it with :func:`training_for_preset`.
"""

from __future__ import annotations

from unisd_components.config import (
    AgreementConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    TrainingConfig,
    VariantConfig,
)

__all__ = ["PRESET_TRAINING_OVERRIDES", "PRESETS", "training_for_preset"]

PRESETS: dict[str, VariantConfig] = {
    "unisd_star": VariantConfig(
        method="sdft",
        alpha=0.0,
        agreement=AgreementConfig(level="token", k=3, strategy="retrieval", gamma=1.0),
        contrastive=ContrastiveConfig(weight=0.1, margin=0.5),
        ema=EMAConfig(beta=0.9, sync_steps=10),
        feature_matching=FeatureMatchingConfig(weight=0.1),
    ),
    "unisd_star_paper": VariantConfig(
        method="sdft",
        alpha=0.0,
        agreement=AgreementConfig(level="token", k=3, strategy="retrieval", gamma=0.001),
        contrastive=ContrastiveConfig(weight=0.01, margin=0.1),
        ema=EMAConfig(beta=0.98, sync_steps=10),
        feature_matching=FeatureMatchingConfig(weight=0.01),
    ),
}

# Training-side differences of a preset. ``batch_size_factor`` multiplies TrainingConfig.batch_size.
PRESET_TRAINING_OVERRIDES: dict[str, dict[str, float]] = {
    "unisd_star_paper": {"batch_size_factor": 0.5},
}


def training_for_preset(name: str, training: TrainingConfig) -> TrainingConfig:
    """``training`` with the preset's overrides applied (batch halved for ``unisd_star_paper``, min 1)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {sorted(PRESETS)}")
    overrides = PRESET_TRAINING_OVERRIDES.get(name, {})
    factor = overrides.get("batch_size_factor", 1.0)
    if factor == 1.0:
        return training
    return training.model_copy(update={"batch_size": max(1, int(training.batch_size * factor))})
