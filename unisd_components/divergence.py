"""Per-token divergences between student and teacher next-token distributions, and their clipping.

All math is fp32 and in log space. A vocabulary entry whose log-prob is ``-inf`` (masked vocabulary)
in a distribution contributes nothing to a KL taken under that distribution, and never produces NaN,
in the value or in the gradient. A token the teacher supports but the student gives ``-inf`` makes
forward KL ``+inf``: that is its true value, and the trainer's non-finite check reports it.

Example::

    d = token_divergence(student_logps, teacher_logps, alpha=0.0)     # [B,T], forward KL(T||S)
    d = clip_divergence(d, mask, quantile=0.99)                        # adaptive cap
"""

from __future__ import annotations

import math

import torch

__all__ = ["clip_cap", "clip_divergence", "kl_divergence", "token_divergence"]


def kl_divergence(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``KL(p || q) = Σ_v p_v (log p_v - log q_v)`` over the last axis, 0·log 0 taken as 0."""
    logp = logp.float()
    logq = logq.float()
    p = logp.exp()
    # where (not multiply) so a -inf - -inf in an unused entry cannot turn into NaN.
    diff = torch.where(p > 0, logp - logq, 0.0)
    return (p * diff).sum(-1)


def _log_mixture(student_logps: torch.Tensor, teacher_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log((1-alpha)·p_S + alpha·p_T)`` by logaddexp, guarded where both are ``-inf``."""
    a = student_logps + math.log1p(-alpha)
    b = teacher_logps + math.log(alpha)
    both_empty = torch.isneginf(a) & torch.isneginf(b)
    # Entries with p_S = p_T = 0 are never used (their weight in both KLs is 0); give logaddexp finite
    # inputs there because its backward at (-inf, -inf) is NaN even when multiplied by a zero gradient.
    a = torch.where(both_empty, 0.0, a)
    b = torch.where(both_empty, 0.0, b)
    return torch.logaddexp(a, b)


def token_divergence(student_logps: torch.Tensor, teacher_logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-token divergence ``[B,T,V]`` x2 -> ``[B,T]`` (fp32).

    ``alpha == 0``: forward ``KL(p_T || p_S)``; ``alpha == 1``: reverse ``KL(p_S || p_T)``; otherwise the
    generalized JSD ``alpha·KL(p_T||m) + (1-alpha)·KL(p_S||m)`` with ``m = (1-alpha)·p_S + alpha·p_T``,
    bounded by the binary entropy of ``alpha`` (at most ln 2). Inputs are log-probabilities
    (log-softmax already applied, temperature already divided in).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s = student_logps.float()
    u = teacher_logps.float()
    if alpha == 0.0:
        return kl_divergence(u, s)
    if alpha == 1.0:
        return kl_divergence(s, u)
    log_m = _log_mixture(s, u, alpha)
    return alpha * kl_divergence(u, log_m) + (1.0 - alpha) * kl_divergence(s, log_m)


def clip_divergence(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    cap: float | None = None,
    quantile: float | None = None,
) -> torch.Tensor:
    """``D_t <- min(D_t, c)``: static ``c = cap`` or adaptive ``c`` = the ``quantile`` of masked ``D_t``.

    Give exactly one of ``cap``/``quantile``. The adaptive cap is computed under ``no_grad`` over the
    masked (real completion) tokens only, with linear interpolation (numpy's default); it is a
    constant, not differentiated. Clipped tokens get zero gradient. With no masked token the input is
    returned unchanged.
    """
    if (cap is None) == (quantile is None):
        raise ValueError("clip_divergence needs exactly one of cap= or quantile=")
    if quantile is not None:
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"quantile must be in (0, 1], got {quantile}")
        c = clip_cap(per_token, mask, quantile)
        if c is None:
            return per_token
        return torch.minimum(per_token, c)
    return per_token.clamp(max=float(cap))


@torch.no_grad()
def clip_cap(per_token: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor | None:
    """The adaptive cap: the ``quantile`` of ``per_token`` over masked positions (``None`` if none)."""
    values = per_token.detach().float()[mask.bool()]
    if values.numel() == 0:
        return None
    return torch.quantile(values, quantile).to(per_token.dtype)
