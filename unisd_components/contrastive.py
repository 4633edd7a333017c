"""Token-level contrastive hinge (mechanism 2): stay closer to the positive teacher than to the negative.

Per token ``relu(margin + |ℓ^S_t - ℓ^T_t| - |ℓ^S_t - ℓ^{T-}_t|)`` on the sampled token's log-prob under
the student, the demonstration teacher and the negative (wrong-demonstration) teacher; the teachers
are detached, so only the student receives gradient.
"""

from __future__ import annotations

import torch

from unisd_components.losses import weighted_sequence_mean

__all__ = ["contrastive_hinge", "hinge_per_token"]


def hinge_per_token(
    student_tok_logps: torch.Tensor,
    teacher_tok_logps: torch.Tensor,
    negative_tok_logps: torch.Tensor,
    margin: float = 0.5,
) -> torch.Tensor:
    """The per-token hinge ``[B,T]`` (fp32); a value > 0 is a margin violation."""
    s = student_tok_logps.float()
    pos = (s - teacher_tok_logps.detach().float()).abs()
    neg = (s - negative_tok_logps.detach().float()).abs()
    return torch.relu(margin + pos - neg)


def contrastive_hinge(
    student_tok_logps: torch.Tensor,
    teacher_tok_logps: torch.Tensor,
    negative_tok_logps: torch.Tensor,
    mask: torch.Tensor,
    margin: float = 0.5,
) -> torch.Tensor:
    """Scalar: masked mean of the hinge per sequence, then the batch mean. Inputs ``[B,T]``."""
    per_token = hinge_per_token(student_tok_logps, teacher_tok_logps, negative_tok_logps, margin)
    return weighted_sequence_mean(per_token, mask)
