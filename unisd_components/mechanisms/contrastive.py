"""Mechanism 2, contrastive: a token-level hinge that keeps the student closer to the teacher than to a
wrong-demonstration (negative) teacher (math: :mod:`unisd_components.contrastive`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import Field

from unisd_components.component import Component, ExtraContexts, SetupContext, StepScores
from unisd_components.registry import MechanismConfig, register_mechanism

if TYPE_CHECKING:
    import torch

__all__ = ["ContrastiveComponent", "ContrastiveConfig"]


class ContrastiveConfig(MechanismConfig):
    """Mechanism 2: token-level hinge against a negative (wrong-demonstration) teacher."""

    weight: float = Field(0.1, ge=0, description="lambda_c")
    margin: float = Field(0.5, ge=0)


class ContrastiveComponent(Component):
    """Mechanism 2: hinge that keeps the student closer to the teacher than to a wrong-demonstration one."""

    name = "contrastive"
    generates_in_setup = True  # one negative demonstration per training example, cached per study
    config: ContrastiveConfig

    @classmethod
    def extra_context_count(cls, config: ContrastiveConfig) -> int:
        return 1

    def setup(self, ctx: SetupContext) -> None:
        from unisd_components import contexts

        negatives = contexts.build_negatives(
            ctx.model,
            ctx.tokenizer,
            ctx.examples,
            ctx.cache_dir,
            ctx.model_id,
            max_new_tokens=ctx.max_new_tokens,
            seed=ctx.seed,
            batch_size=ctx.batch_size,
        )
        self._contexts = {
            ex.id: contexts.demonstration_context(ex.messages, negatives[ex.id]) for ex in ctx.examples
        }

    def extra_contexts(self, examples: Sequence[Any]) -> ExtraContexts:
        # Same temperature as the student and main teacher token log-probs it is compared with.
        return ExtraContexts([[self._contexts[ex.id] for ex in examples]], None)

    def loss_terms(self, scores: StepScores, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
        import torch

        from unisd_components.contrastive import contrastive_hinge, hinge_per_token

        negative = scores.context_token_logps[self.name][0]
        margin = self.config.margin
        hinge = contrastive_hinge(
            scores.student_token_logps, scores.teacher_token_logps, negative, scores.mask, margin
        )
        with torch.no_grad():
            per_token = hinge_per_token(
                scores.student_token_logps, scores.teacher_token_logps, negative, margin
            )
            violated = (per_token > 0)[scores.mask]
            metrics["contrastive_violation_frac"] = (
                float(violated.float().mean()) if violated.numel() else 0.0
            )
            metrics["contrastive_hinge"] = float(hinge)
        return {"contrastive": self.config.weight * hinge}


register_mechanism(ContrastiveConfig, ContrastiveComponent)
