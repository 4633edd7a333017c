"""Mechanism 4, feature matching: MSE between the student's and the (detached) teacher's final hidden
states at completion positions (math: :mod:`unisd_components.feature_matching`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from unisd_components.component import Component, StepScores
from unisd_components.registry import MechanismConfig, register_mechanism

if TYPE_CHECKING:
    import torch

__all__ = ["FeatureMatchingComponent", "FeatureMatchingConfig"]


class FeatureMatchingConfig(MechanismConfig):
    """Mechanism 4: final-layer hidden-state MSE against the teacher at completion positions."""

    weight: float = Field(0.1, ge=0, description="lambda_f")
    match_repr: bool = Field(False, description="use the feature term alone, without the divergence")


class FeatureMatchingComponent(Component):
    """Mechanism 4: MSE between student and (detached) teacher final hidden states."""

    name = "feature_matching"
    needs_hidden = True
    config: FeatureMatchingConfig

    def __init__(self, config: FeatureMatchingConfig) -> None:
        super().__init__(config)
        self.drops_divergence = config.match_repr

    def loss_terms(self, scores: StepScores, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
        from unisd_components.feature_matching import hidden_state_mse

        assert scores.student_hidden is not None and scores.teacher_hidden is not None
        mse = hidden_state_mse(scores.student_hidden, scores.teacher_hidden, scores.mask)
        metrics["feature_mse"] = float(mse.detach())
        return {"feature": self.config.weight * mse}


register_mechanism(FeatureMatchingConfig, FeatureMatchingComponent)
