"""EMA teacher (mechanism 3): ``phi <- beta·phi + (1-beta)·theta`` over every parameter the student trains.

Parameters are matched by name, so the teacher must be a copy of the student with the same structure
(e.g. ``copy.deepcopy`` of the peft-wrapped student). Under LoRA the student trains only the adapter
weights, and those are exactly what moves: the reference code skipped them, so its EMA teacher never
changed under LoRA. The teacher's own ``requires_grad`` flags do not matter (it is usually frozen).

Example::

    teacher = copy.deepcopy(student).requires_grad_(False)
    ...
    if step % sync_steps == 0:
        ema_update_(teacher, student, beta=0.9)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["ema_update_"]


@torch.no_grad()
def ema_update_(
    teacher: nn.Module, student: nn.Module, beta: float, *, rename: Callable[[str], str] | None = None
) -> int:
    """Update ``teacher`` in place; returns how many parameter tensors were updated.

    ``rename`` maps a student parameter name to the teacher's, for a teacher that is a second LoRA
    adapter on the student's own base model (``teacher`` is then the student itself), e.g.
    ``rename=lambda n: n.replace(".default.", ".teacher.")``: the base weights are shared, not copied.

    Raises ``ValueError`` if a trainable student parameter has no same-named, same-shaped teacher
    parameter (a silent skip is how an EMA teacher ends up frozen).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    teacher_params = dict(teacher.named_parameters())
    updated = 0
    for name, theta in student.named_parameters():
        if not theta.requires_grad:
            continue
        teacher_name = rename(name) if rename is not None else name
        phi = teacher_params.get(teacher_name)
        if phi is None:
            raise ValueError(f"EMA teacher has no parameter {teacher_name!r} (is it a copy of the student?)")
        if phi.shape != theta.shape:
            raise ValueError(f"EMA shape mismatch for {name!r}: {tuple(phi.shape)} vs {tuple(theta.shape)}")
        if phi is theta:
            raise ValueError(f"EMA teacher shares parameter {name!r} with the student; deep-copy it first")
        # lerp: phi + (1-beta)(theta - phi) == beta*phi + (1-beta)*theta, in the teacher's dtype/device.
        phi.lerp_(theta.detach().to(device=phi.device, dtype=phi.dtype), 1.0 - beta)
        updated += 1
    return updated
