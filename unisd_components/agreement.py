"""Multi-teacher agreement weights (mechanism 1): down-weight what K teacher contexts disagree on.

Input: the sampled tokens' log-probs under K extra teacher contexts, ``[K,B,T]`` (from one batched,
gradient-free forward). Output: weights, computed without gradient (they weight the loss, they are
not trained through). Disagreement is the population variance over k (``stat="var"``) or the range
``max_k - min_k`` (``stat="range"``).

- token level, ``[B,T]``: normalise ``d_t`` by the ``quantile`` of d over the masked tokens (floor
  1e-6), cap the normalised value, ``w_t = 1 / (1 + gamma·d~_t)``, floored at ``floor``. Padded positions
  get weight 0. Used inside the sequence mean: ``losses.masked_sequence_means(D, mask, w)``.
- sequence level, ``[B]``: ``s_k`` = masked mean over t of ``ℓ_{k,t}``; ``w_b = exp(-gamma·d_b)`` floored
  at 1e-6. Used as ``losses.sequence_weighted_mean(L_b, w_b)``, never inside the token normalisation
  (where it would cancel).

Example::

    w = token_agreement_weights(ctx_logps, mask, gamma=1.0)          # [B,T]
    loss = weighted_sequence_mean(divergence, mask, w)
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["disagreement", "sequence_agreement_weights", "token_agreement_weights"]

Stat = Literal["var", "range"]

_NORMALISER_FLOOR = 1e-6
_SEQUENCE_WEIGHT_FLOOR = 1e-6


def disagreement(values: torch.Tensor, stat: Stat = "var") -> torch.Tensor:
    """Spread over the first axis: population variance (``var``) or ``max - min`` (``range``)."""
    if values.shape[0] < 2:
        raise ValueError(f"agreement needs at least 2 contexts, got {values.shape[0]}")
    if stat == "var":
        return values.var(dim=0, unbiased=False)
    if stat == "range":
        return values.amax(dim=0) - values.amin(dim=0)
    raise ValueError(f"unknown disagreement stat {stat!r}; use 'var' or 'range'")


@torch.no_grad()
def token_agreement_weights(
    context_logps: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    stat: Stat = "var",
    quantile: float = 0.95,
    cap: float = 10.0,
    floor: float = 0.01,
) -> torch.Tensor:
    """Token weights ``[B,T]`` from sampled-token log-probs ``[K,B,T]`` (fp32, no gradient, 0 at padding)."""
    mask = mask.bool()
    logps = torch.where(mask, context_logps.detach().float(), 0.0)
    d = disagreement(logps, stat)
    masked_d = d[mask]
    if masked_d.numel() == 0:
        return torch.zeros_like(d)
    normaliser = torch.quantile(masked_d, quantile).clamp(min=_NORMALISER_FLOOR)
    d_norm = (d / normaliser).clamp(max=cap)
    w = (1.0 / (1.0 + gamma * d_norm)).clamp(min=floor)
    return torch.where(mask, w, 0.0)


@torch.no_grad()
def sequence_agreement_weights(
    context_logps: torch.Tensor, mask: torch.Tensor, gamma: float, stat: Stat = "var"
) -> torch.Tensor:
    """One weight per sequence ``[B]``: ``exp(-gamma · spread_k(masked mean_t ℓ_{k,t}))``, floor 1e-6."""
    mask = mask.bool()
    logps = torch.where(mask, context_logps.detach().float(), 0.0)
    counts = mask.sum(-1).clamp(min=1).float()
    per_context_means = logps.sum(-1) / counts  # [K,B]
    d = disagreement(per_context_means, stat)
    return torch.exp(-gamma * d).clamp(min=_SEQUENCE_WEIGHT_FLOOR)
