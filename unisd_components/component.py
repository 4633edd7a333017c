"""The interface of a mechanism: a :class:`Component` with hooks the trainer calls at fixed points.

Why a module of its own, free of torch at import time: a mechanism module (config + component) must be
importable by the study spec, which validates YAML in well under a second and never needs the training
stack. Tensor work happens inside the hooks, which run only during training.

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

Flags: ``needs_hidden`` (final hidden states of student and teacher), ``needs_full_distribution``
(``scores.student_logps``/``teacher_logps``, ``[B,T,V]``: the fused loss never builds them, so a variant
with such a mechanism trains on the unfused path), ``needs_ema_teacher``,
``drops_divergence`` (the divergence is logged but not optimised). Cost facts for the study plan, read
without torch: :meth:`Component.extra_context_count` (teacher forwards per prompt beyond the main one)
and ``generates_in_setup`` (``setup`` samples one completion per training example, once per study).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Component", "ExtraContexts", "SetupContext", "StepScores"]


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
    batch_size: int = 8  # setup generations (negatives) run that many prompts at once


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
    # [B,T,V] fp32 at the loss temperature (student with gradient); None under the fused loss
    # (training.fused_loss), which never builds them: components use the [B,T] fields below.
    student_logps: torch.Tensor | None
    teacher_logps: torch.Tensor | None
    student_token_logps: torch.Tensor  # sampled-token log-probs, with gradient
    teacher_token_logps: torch.Tensor
    student_hidden: torch.Tensor | None = None  # [B,T,H] final hidden states (after the final norm)
    teacher_hidden: torch.Tensor | None = None
    context_token_logps: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n,B,T]


class Component:
    """Base class of a mechanism: every hook is a no-op."""

    name: ClassVar[str] = ""
    needs_hidden: ClassVar[bool] = False
    needs_full_distribution: ClassVar[bool] = False
    needs_ema_teacher: ClassVar[bool] = False
    generates_in_setup: ClassVar[bool] = False
    drops_divergence: bool = False

    def __init__(self, config: BaseModel) -> None:
        self.config = config

    @classmethod
    def extra_context_count(cls, config: BaseModel) -> int:
        """Extra teacher contexts scored per prompt (what :meth:`extra_contexts` returns), for cost plans."""
        return 0

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
