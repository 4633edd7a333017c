"""Reductions from per-token losses to the scalar the optimizer sees.

Every term of the objective is reduced the same way (per sequence, then over the batch) so that a long
completion does not outweigh a short one, and so that padding can never leak into the loss: masked
positions are selected away with ``torch.where`` (not multiplied by 0), so a NaN or inf at a padded
position changes neither the value nor the gradient.

Example::

    per_seq = masked_sequence_means(per_token, mask, weights)   # [B]
    loss = sequence_weighted_mean(per_seq, seq_weights)         # mean_b(w_b * L_b)
"""

from __future__ import annotations

import torch

__all__ = ["masked_sequence_means", "sequence_weighted_mean", "weighted_sequence_mean"]


def masked_sequence_means(
    per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per sequence ``Σ_t mask·w·x / max(Σ_t mask·w, 1)``: ``[B,T]`` -> ``[B]`` (fp32).

    ``weights`` (``[B,T]``, e.g. token agreement weights) defaults to 1. The ``max(·, 1)`` keeps an
    all-padding sequence at 0 instead of 0/0.
    """
    mask = mask.bool()
    x = torch.where(mask, per_token.float(), 0.0)
    w = mask.float() if weights is None else torch.where(mask, weights.float(), 0.0)
    return (w * x).sum(-1) / (w.sum(-1).clamp(min=1.0))


def weighted_sequence_mean(
    per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Batch mean of :func:`masked_sequence_means`: the scalar loss of a per-token term."""
    return masked_sequence_means(per_token, mask, weights).mean()


def sequence_weighted_mean(
    per_seq_loss: torch.Tensor, seq_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """``mean_b(w_b · L_b)``: sequence-level agreement weights multiply each sequence's mean loss.

    Applied after the per-sequence normalisation on purpose: folding ``w_b`` into the token
    normalisation (as the reference code does) divides it out again and makes the weight a no-op.
    """
    per_seq_loss = per_seq_loss.float()
    if seq_weights is None:
        return per_seq_loss.mean()
    return (seq_weights.float() * per_seq_loss).mean()
