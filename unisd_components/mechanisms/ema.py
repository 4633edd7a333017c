"""Mechanism 3, EMA teacher: the teacher follows the student every ``sync_steps`` optimizer steps
(math: :mod:`unisd_components.ema`; the teacher objects: :mod:`unisd_components.teachers`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field

from unisd_components.component import Component
from unisd_components.registry import MechanismConfig, register_mechanism

if TYPE_CHECKING:
    from torch import nn

__all__ = ["EMAComponent", "EMAConfig"]


class EMAConfig(MechanismConfig):
    """Mechanism 3: EMA teacher, phi <- beta*phi + (1-beta)*theta every sync_steps optimizer steps."""

    beta: float = Field(0.9, ge=0, lt=1)
    sync_steps: int = Field(10, ge=1)


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


register_mechanism(EMAConfig, EMAComponent)
