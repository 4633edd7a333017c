"""The component registry: each UniSD mechanism as an object with hooks the trainer calls by name.

The trainer knows nothing about any mechanism: it asks every enabled component, at fixed points of the
step, for extra teacher contexts, token and sequence weights, a transformed divergence, extra loss
terms, and what to do after an optimizer step. A sixth mechanism is one module with a
:class:`Component` subclass, its config field on ``VariantConfig``, and one entry in :data:`REGISTRY`.

Hooks (all optional; the base class does nothing):

- ``setup(ctx)``: once, before training, with the base (still untrained) model: build caches
  (retrieval embeddings, induced instructions, negative demonstrations).
- ``extra_contexts(examples)``: teacher contexts to score the completions under, ``[n][B]`` message
  lists; they are scored in ONE batched gradient-free forward with the main teacher, keeping only the
  sampled-token log-probs (``scores.context_token_logps[name]``, ``[n,B,T]``).
- ``transform_divergence(per_token, mask, metrics)``: e.g. clipping.
- ``token_weights(scores, metrics)`` ``[B,T]`` / ``sequence_weights(scores, metrics)`` ``[B]``.
- ``loss_terms(scores, metrics)``: ``{term name: weighted scalar}`` added to the loss.
- ``after_optimizer_step(step, student, teacher)``: e.g. the EMA sync.

Flags: ``needs_hidden`` (final hidden states of student and teacher), ``needs_ema_teacher``,
``drops_divergence`` (the divergence is logged but not optimised).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel
from torch import nn

from unisd_components import contexts
from unisd_components.agreement import sequence_agreement_weights, token_agreement_weights
from unisd_components.config import (
    AgreementConfig,
    ClippingConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    VariantConfig,
)
from unisd_components.contrastive import contrastive_hinge, hinge_per_token
from unisd_components.divergence import clip_cap
from unisd_components.feature_matching import hidden_state_mse

__all__ = [
    "REGISTRY",
    "AgreementComponent",
    "ClippingComponent",
    "Component",
    "ContrastiveComponent",
    "EMAComponent",
    "ExtraContexts",
    "FeatureMatchingComponent",
    "SetupContext",
    "StepScores",
    "build_components",
]


@dataclass
class SetupContext:
    """What a component may use to prepare itself before the first step."""

    model: nn.Module
    tokenizer: Any
    examples: Sequence[Any]
    cache_dir: Path
    model_id: str
    seed: int
    max_new_tokens: int = 256


@dataclass
class ExtraContexts:
    """``messages[j][b]``: the j-th extra context of batch example b; ``temperature`` None = loss temperature."""

    messages: list[list[list[dict]]]
    temperature: float | None = None


@dataclass
class StepScores:
    """Everything one micro-step scored, at completion positions only (``[B,T]`` unless noted)."""

    mask: torch.Tensor  # bool, real completion tokens (up to and including EOS)
    tokens: torch.Tensor  # long, the completion token ids
    student_logps: torch.Tensor  # [B,T,V] fp32 at the loss temperature, with gradient
    teacher_logps: torch.Tensor  # [B,T,V] fp32 at the loss temperature, no gradient
    student_token_logps: torch.Tensor  # sampled-token log-probs, with gradient
    teacher_token_logps: torch.Tensor
    student_hidden: torch.Tensor | None = None  # [B,T,H] final hidden states (after the final norm)
    teacher_hidden: torch.Tensor | None = None
    context_token_logps: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n,B,T]


class Component:
    """Base class of a mechanism: every hook is a no-op."""

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False
    needs_ema_teacher: ClassVar[bool] = False
    drops_divergence: bool = False

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    def setup(self, ctx: SetupContext) -> None:
        return None

    def extra_contexts(self, examples: Sequence[Any]) -> ExtraContexts | None:
        return None

    def transform_divergence(
        self, per_token: torch.Tensor, mask: torch.Tensor, metrics: dict[str, float]
    ) -> torch.Tensor:
        return per_token

    def token_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        return None

    def sequence_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        return None

    def loss_terms(self, scores: StepScores, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
        return {}

    def after_optimizer_step(self, step: int, student: nn.Module, teacher: Any) -> dict[str, float]:
        return {}


class AgreementComponent(Component):
    """Mechanism 1: weight tokens (or sequences) by how much K few-shot teacher contexts agree."""

    name = "agreement"
    config: AgreementConfig

    def setup(self, ctx: SetupContext) -> None:
        cfg = self.config
        embeddings: np.ndarray | None = None
        if cfg.strategy == "retrieval":
            from unisd_components.embeddings import example_embeddings

            embeddings = example_embeddings(ctx.examples, ctx.cache_dir)  # once; rows sliced per benchmark
        self._contexts = {}
        # Donors, neighbours and induced instructions come from the prompt's own benchmark: a ScienceQA
        # question never gets an MBPP donor when several benchmarks train one model.
        for benchmark, rows in contexts.by_benchmark(ctx.examples).items():
            members = [ctx.examples[i] for i in rows]
            if cfg.strategy != "induction" and len(members) < 2:
                raise ValueError(
                    f"agreement donors come from the prompt's own benchmark, and {benchmark!r} has only "
                    "one training example"
                )
            instructions: list[str] | None = None
            if cfg.strategy == "induction":
                instructions = contexts.induce_instructions(
                    ctx.model, ctx.tokenizer, members, cfg.k, ctx.cache_dir, ctx.model_id, seed=ctx.seed
                )
            for i, ex in enumerate(members):
                self._contexts[ex.id] = contexts.fewshot_contexts(
                    i,
                    members,
                    cfg.k,
                    cfg.strategy,
                    ctx.seed,
                    n_shots=cfg.n_shots,
                    embeddings=None if embeddings is None else embeddings[rows],
                    instructions=instructions,
                )

    def extra_contexts(self, examples: Sequence[Any]) -> ExtraContexts:
        per_example = [self._contexts[ex.id] for ex in examples]
        # Agreement is measured at temperature 1 (unisd-method.md, mechanism 1).
        return ExtraContexts([[ctx[j] for ctx in per_example] for j in range(self.config.k)], 1.0)

    def _logps(self, scores: StepScores) -> torch.Tensor:
        return scores.context_token_logps[self.name]

    def token_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        if self.config.level != "token":
            return None
        cfg = self.config
        w = token_agreement_weights(
            self._logps(scores), scores.mask, cfg.gamma, cfg.stat, cfg.quantile, cfg.cap, cfg.floor
        )
        _weight_metrics(w[scores.mask], metrics)
        return w

    def sequence_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        if self.config.level != "sequence":
            return None
        w = sequence_agreement_weights(self._logps(scores), scores.mask, self.config.gamma, self.config.stat)
        _weight_metrics(w, metrics)
        return w


def _weight_metrics(values: torch.Tensor, metrics: dict[str, float]) -> None:
    if values.numel():
        metrics["agreement_weight_mean"] = float(values.mean())
        metrics["agreement_weight_min"] = float(values.min())


class ContrastiveComponent(Component):
    """Mechanism 2: hinge that keeps the student closer to the teacher than to a wrong-demonstration one."""

    name = "contrastive"
    config: ContrastiveConfig

    def setup(self, ctx: SetupContext) -> None:
        negatives = contexts.build_negatives(
            ctx.model,
            ctx.tokenizer,
            ctx.examples,
            ctx.cache_dir,
            ctx.model_id,
            max_new_tokens=ctx.max_new_tokens,
            seed=ctx.seed,
        )
        self._contexts = {
            ex.id: contexts.demonstration_context(ex.messages, negatives[ex.id]) for ex in ctx.examples
        }

    def extra_contexts(self, examples: Sequence[Any]) -> ExtraContexts:
        # Same temperature as the student and main teacher token log-probs it is compared with.
        return ExtraContexts([[self._contexts[ex.id] for ex in examples]], None)

    def loss_terms(self, scores: StepScores, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
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


class EMAComponent(Component):
    """Mechanism 3: the teacher follows the student, ``phi <- beta·phi + (1-beta)·theta`` every sync_steps."""

    name = "ema"
    needs_ema_teacher = True
    config: EMAConfig

    def after_optimizer_step(self, step: int, student: nn.Module, teacher: Any) -> dict[str, float]:
        if step % self.config.sync_steps != 0:
            return {}
        updated = teacher.ema_update(student, self.config.beta)
        return {"ema_synced_tensors": float(updated)}


class FeatureMatchingComponent(Component):
    """Mechanism 4: MSE between student and (detached) teacher final hidden states."""

    name = "feature_matching"
    needs_hidden = True
    config: FeatureMatchingConfig

    def __init__(self, config: FeatureMatchingConfig) -> None:
        super().__init__(config)
        self.drops_divergence = config.match_repr

    def loss_terms(self, scores: StepScores, metrics: dict[str, float]) -> dict[str, torch.Tensor]:
        assert scores.student_hidden is not None and scores.teacher_hidden is not None
        mse = hidden_state_mse(scores.student_hidden, scores.teacher_hidden, scores.mask)
        metrics["feature_mse"] = float(mse.detach())
        return {"feature": self.config.weight * mse}


class ClippingComponent(Component):
    """Mechanism 5: cap each token's divergence (static cap or the batch's q-quantile)."""

    name = "clipping"
    config: ClippingConfig

    def transform_divergence(
        self, per_token: torch.Tensor, mask: torch.Tensor, metrics: dict[str, float]
    ) -> torch.Tensor:
        if self.config.mode == "static":
            cap = torch.tensor(self.config.cap, dtype=per_token.dtype, device=per_token.device)
        else:
            cap = clip_cap(per_token, mask, self.config.quantile)
            if cap is None:
                return per_token
        with torch.no_grad():
            clipped = (per_token.detach() > cap)[mask.bool()]
            metrics["clip_cap"] = float(cap)
            metrics["clip_frac"] = float(clipped.float().mean()) if clipped.numel() else 0.0
        return torch.minimum(per_token, cap)


# name -> component class; the name is also the VariantConfig field that holds its config.
REGISTRY: dict[str, type[Component]] = {
    "agreement": AgreementComponent,
    "contrastive": ContrastiveComponent,
    "ema": EMAComponent,
    "feature_matching": FeatureMatchingComponent,
    "clipping": ClippingComponent,
}


def build_components(
    variant: VariantConfig, registry: dict[str, type[Component]] | None = None
) -> list[Component]:
    """The enabled components of ``variant``, in registry order."""
    registry = REGISTRY if registry is None else registry
    built = []
    for name, cls in registry.items():
        config = getattr(variant, name, None)
        if config is not None:
            built.append(cls(config))
    return built
