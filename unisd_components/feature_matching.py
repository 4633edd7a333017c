"""Feature matching (mechanism 4): pull the student's final hidden states toward the teacher's.

``mean_over_hidden((h^S_t - stopgrad(h^T_t))^2)`` at completion positions (hidden states after the
final norm), masked mean per sequence, then the batch mean.
"""

from __future__ import annotations

import torch

from unisd_components.losses import weighted_sequence_mean

__all__ = ["hidden_state_mse"]


def hidden_state_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Scalar MSE from ``[B,T,H]`` hidden states; the teacher tensor is detached (no gradient reaches it)."""
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"hidden shapes differ: {tuple(student_hidden.shape)} vs {tuple(teacher_hidden.shape)}"
        )
    per_token = (student_hidden.float() - teacher_hidden.detach().float()).pow(2).mean(-1)
    return weighted_sequence_mean(per_token, mask)
