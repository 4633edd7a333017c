"""The LM head and the per-token divergence, fused and chunked: no ``[B,T,V]`` tensor ever exists.

The unfused step (``training.fused_loss: false``, the reference) builds the student's and the teacher's
full-vocabulary log-probs ``[B,T,V]`` in fp32, then the divergence and its gradient on top: about five
such tensors deep, 2.4 GB each at B = 4, T = 1024, V = 152k. Here (as Liger-Kernel's fused linear JSD and
TRL's chunked distillation loss do) the completion positions that count (the mask's) are cut into chunks
of ``chunk_tokens`` positions; per chunk the student's and the teacher's logits are projected from their
final hidden states, divided by the loss temperature, log-softmaxed in fp32 and reduced to per-token
values, then freed. What leaves the function is ``[B,T]`` only:

- ``divergence``: ``D_t`` (forward KL at ``alpha = 0``, reverse KL at 1, generalized JSD otherwise),
  differentiable;
- ``token_logps``: the student's log-prob of the sampled token, differentiable (contrastive hinge,
  KL to base, the SFT cross-entropy);
- ``teacher_token_logps``, ``forward_kl`` and ``entropy``: no gradient (the contrastive hinge's positive
  teacher, the ``kl`` and ``entropy`` metrics).

Everything downstream (clipping and its quantile, agreement weights, the masked means, the contrastive
hinge, k3 to base) is the unfused code itself, run on those ``[B,T]`` tensors, so both paths share one
definition of the loss. A clipped token's ``min(D, c)`` hands back a zero upstream gradient, so it gets
none here either. The backward (an :class:`torch.autograd.Function`) receives the upstream gradients
``g_D``, ``g_s`` ``[B,T]`` and recomputes each chunk's logits to form the analytic gradient of the logits,

    dL/dz = g_D · dD/dz + g_s · (onehot(y) - p),    z = head(h) / tau,
    forward KL:  dD/dz = p - q
    reverse KL:  dD/dz = p ⊙ (s - u - D)
    JSD(alpha):  dD/dz = (1 - alpha) · p ⊙ (s - log m - KL(p || m)),   m = (1-alpha)·p + alpha·q,

(``s, u`` the student's and teacher's log-probs, ``p, q`` their probabilities), then
``dL/dh = dL/dz · W / tau`` and ``dL/dW = (dL/dz)^T · h / tau`` chunk by chunk (final-logit soft-capping
handled by its derivative). Peak memory: a few ``[chunk, V]`` fp32 tensors, whatever ``T``.
The price is one extra LM-head projection of each model per step (the backward recomputes the logits).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from unisd_components.divergence import kl_divergence, token_divergence

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "FusedScores",
    "HeadWeights",
    "chunk_tokens_for",
    "fused_head_scores",
    "head_weights",
]

# Logits per chunk when the chunk size is not set: 16M fp32 = 64 MiB per [chunk, V] tensor (110 positions
# at a 152k vocabulary, 341 at 49k); the forward and the backward each hold about four of them.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class HeadWeights:
    """An LM head as plain tensors: ``logits = softcap(h @ weight.T + bias)``."""

    weight: torch.Tensor  # [V,H]
    bias: torch.Tensor | None = None  # [V]
    softcap: float | None = None  # final logit soft-capping (Gemma): tanh(x / c) * c


@dataclass
class FusedScores:
    """Per-token results ``[B,T]`` (fp32, 0 at positions outside the mask)."""

    token_logps: torch.Tensor
    divergence: torch.Tensor | None = None
    teacher_token_logps: torch.Tensor | None = None
    forward_kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def head_weights(model: nn.Module, *, detach: bool = False) -> HeadWeights:
    """The LM head of ``model`` (peft-wrapped or not) as tensors; a head that is not a plain linear
    layer (a LoRA-adapted head, say) cannot be fused, and says so."""
    from unisd_components.scoring import decoder_and_head

    _, head = decoder_and_head(model)
    if type(head) is not nn.Linear:
        raise TypeError(
            f"the fused loss needs an LM head that is a plain nn.Linear, got {type(head).__name__}; "
            "set training.fused_loss: false"
        )
    weight, bias = head.weight, head.bias
    if detach:
        weight = weight.detach()
        bias = None if bias is None else bias.detach()
    softcap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    return HeadWeights(weight, bias, float(softcap) if softcap else None)


def chunk_tokens_for(vocab: int, chunk_tokens: int | None) -> int:
    """Positions per chunk: ``chunk_tokens`` when given, else about :data:`DEFAULT_CHUNK_ELEMENTS` logits."""
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens))
    return max(16, DEFAULT_CHUNK_ELEMENTS // max(1, vocab))


def fused_head_scores(
    student_hidden: torch.Tensor,
    student_head: HeadWeights,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    temperature: float,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: HeadWeights | None = None,
    alpha: float = 0.0,
    chunk_tokens: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> FusedScores:
    """Per-token divergence and sampled-token log-probs from hidden states ``[B,T,H]``, chunk by chunk.

    Only positions where ``mask`` is set are computed (the others come back as 0: every consumer
    selects them away). Without a teacher only ``token_logps`` (and ``entropy``) are computed (SFT).
    ``compute_dtype`` (e.g. bf16 under CUDA autocast) is the dtype of the LM-head matmuls; the
    log-softmax and everything after it is fp32.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("give both teacher_hidden and teacher_head, or neither")
    mask = mask.bool()
    B, T = mask.shape
    h_s = student_hidden[mask]  # [N,H], differentiable back into student_hidden
    tok = tokens[mask]
    h_t = None if teacher_hidden is None else teacher_hidden[mask].detach()
    t_weight = t_bias = None
    t_cap = None
    if teacher_head is not None:
        t_weight, t_bias, t_cap = teacher_head.weight.detach(), teacher_head.bias, teacher_head.softcap
        t_bias = None if t_bias is None else t_bias.detach()
    chunk = chunk_tokens_for(student_head.weight.shape[0], chunk_tokens)
    outputs = _FusedHeadScores.apply(
        h_s,
        student_head.weight,
        student_head.bias,
        h_t,
        t_weight,
        t_bias,
        tok,
        _Options(float(temperature), float(alpha), chunk, student_head.softcap, t_cap, compute_dtype),
    )
    d, s_tok, u_tok, fkl, ent = outputs

    def scatter(values: torch.Tensor | None) -> torch.Tensor | None:
        if values is None:
            return None
        out = values.new_zeros((B, T))
        return out.masked_scatter(mask, values)

    has_teacher = h_t is not None
    return FusedScores(
        token_logps=scatter(s_tok),
        divergence=scatter(d) if has_teacher else None,
        teacher_token_logps=scatter(u_tok) if has_teacher else None,
        forward_kl=scatter(fkl) if has_teacher else None,
        entropy=scatter(ent),
    )


@dataclass(frozen=True)
class _Options:
    tau: float
    alpha: float
    chunk: int
    softcap: float | None
    teacher_softcap: float | None
    dtype: torch.dtype | None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap, tau, dtype):
    """fp32 ``softcap(h W^T + b) / tau`` and, with soft-capping, the tanh for its derivative."""
    if dtype is not None:  # weight and bias already in dtype (cast once per call, not per chunk)
        z = F.linear(h.to(dtype), weight, bias).float()
    else:
        z = F.linear(h, weight, bias).float()
    th = None
    if softcap:
        th = torch.tanh(z / softcap)
        z = th * softcap
    if tau != 1.0:
        z = z / tau
    return z, th


class _FusedHeadScores(torch.autograd.Function):
    """Inputs are the masked positions' rows ``[N,H]``; outputs ``[N]``: D, s_tok, u_tok, fwd KL, entropy."""

    @staticmethod
    def forward(ctx, h_s, weight, bias, h_t, t_weight, t_bias, tok, opt: _Options):
        N = h_s.shape[0]
        f32 = dict(dtype=torch.float32, device=h_s.device)
        has_teacher = h_t is not None
        d = torch.zeros(N, **f32)
        s_tok = torch.zeros(N, **f32)
        u_tok = torch.zeros(N, **f32)
        fkl = torch.zeros(N, **f32)
        ent = torch.zeros(N, **f32)
        kept = None
        with torch.no_grad():
            weight_mm, bias_mm = _cast(weight, opt.dtype), _cast(bias, opt.dtype)
            t_weight_mm, t_bias_mm = _cast(t_weight, opt.dtype), _cast(t_bias, opt.dtype)
            for a in range(0, N, opt.chunk):
                b = min(N, a + opt.chunk)
                z, th = _logits(h_s[a:b], weight_mm, bias_mm, opt.softcap, opt.tau, opt.dtype)
                s = torch.log_softmax(z, dim=-1)
                del z
                u = None
                idx = tok[a:b, None]
                s_tok[a:b] = s.gather(-1, idx).squeeze(-1)
                p = s.exp()
                ent[a:b] = -(p * s).sum(-1)
                del p
                if has_teacher:
                    zt, _ = _logits(h_t[a:b], t_weight_mm, t_bias_mm, opt.teacher_softcap, opt.tau, opt.dtype)
                    u = torch.log_softmax(zt, dim=-1)
                    del zt
                    u_tok[a:b] = u.gather(-1, idx).squeeze(-1)
                    # The same function as the unfused path: one definition of D.
                    d[a:b] = token_divergence(s, u, opt.alpha)
                    fkl[a:b] = d[a:b] if opt.alpha == 0.0 else kl_divergence(u, s)
                if b == N:  # the last chunk's log-probs stay for the backward: one recompute less
                    kept = (a, s, u, th)
                del s, u, th
        ctx.kept = kept
        ctx.opt = opt
        ctx.has_teacher = has_teacher
        ctx.save_for_backward(h_s, weight, bias, h_t, t_weight, t_bias, tok, d)
        ctx.mark_non_differentiable(u_tok, fkl, ent)
        return d, s_tok, u_tok, fkl, ent

    @staticmethod
    def backward(ctx, g_d, g_s, _g_u, _g_kl, _g_ent):
        h_s, weight, bias, h_t, t_weight, t_bias, tok, d = ctx.saved_tensors
        opt: _Options = ctx.opt
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N = h_s.shape[0]
        grad_h = torch.zeros_like(h_s) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        if g_d is None:
            g_d = torch.zeros(N, dtype=torch.float32, device=h_s.device)
        if g_s is None:
            g_s = torch.zeros(N, dtype=torch.float32, device=h_s.device)
        use_d = ctx.has_teacher and bool(g_d.any())
        kept, ctx.kept = ctx.kept, None
        with torch.no_grad():
            weight_mm, bias_mm = _cast(weight, opt.dtype), _cast(bias, opt.dtype)
            t_weight_mm, t_bias_mm = _cast(t_weight, opt.dtype), _cast(t_bias, opt.dtype)
            # Last chunk first: its log-probs were kept by the forward and are freed before the others.
            for a in reversed(range(0, N, opt.chunk)):
                b = min(N, a + opt.chunk)
                gd, gs = g_d[a:b, None].float(), g_s[a:b, None].float()
                if kept is not None and kept[0] == a:
                    _, s, u, th = kept
                    kept = None
                else:
                    z, th = _logits(h_s[a:b], weight_mm, bias_mm, opt.softcap, opt.tau, opt.dtype)
                    s = torch.log_softmax(z, dim=-1)
                    del z
                    u = None
                p = s.exp()
                if use_d:
                    if u is None:
                        zt, _ = _logits(
                            h_t[a:b], t_weight_mm, t_bias_mm, opt.teacher_softcap, opt.tau, opt.dtype
                        )
                        u = torch.log_softmax(zt, dim=-1)
                        del zt
                    dz = _divergence_grad(s, u, p, d[a:b, None], opt.alpha)
                    u = None
                    dz.mul_(gd)
                    dz.sub_(p.mul_(gs))  # p is not needed after this
                else:
                    dz = p.mul_(-gs)
                del s, u
                dz.scatter_add_(-1, tok[a:b, None], gs)
                # z = softcap(raw) / tau: d raw = dz / tau · (1 - tanh^2)
                if opt.tau != 1.0:
                    dz.div_(opt.tau)
                if th is not None:
                    dz.mul_(1.0 - th * th)
                    del th
                hs = h_s[a:b]
                if opt.dtype is not None:
                    dz_mm, hs_mm = dz.to(opt.dtype), hs.to(opt.dtype)
                else:
                    dz_mm, hs_mm = dz.to(weight.dtype), hs.to(weight.dtype)
                if need_h:
                    grad_h[a:b] = (dz_mm @ weight_mm).to(grad_h.dtype)
                if need_w:
                    grad_w.add_((dz_mm.t() @ hs_mm).float())
                if need_b:
                    grad_b.add_(dz.sum(0))
                del dz, dz_mm
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None


def _cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    return t if t is None or dtype is None else t.to(dtype)


def _divergence_grad(s, u, p, d, alpha: float) -> torch.Tensor:
    """``dD/dz`` ``[c,V]`` of the per-token divergence w.r.t. the student's tempered logits (a new tensor)."""
    if alpha == 0.0:  # forward KL(q || p): p - q
        return torch.sub(p, u.exp())
    if alpha == 1.0:  # reverse KL(p || q): p (s - u - D), 0 where p = 0
        diff = torch.where(p > 0, s - u, 0.0)
        return diff.sub_(d).mul_(p)
    a = s + torch.log1p(torch.tensor(-alpha)).item()
    c = u + torch.log(torch.tensor(alpha)).item()
    both_empty = torch.isneginf(a) & torch.isneginf(c)
    log_m = torch.logaddexp(torch.where(both_empty, 0.0, a), torch.where(both_empty, 0.0, c))
    del a, c, both_empty
    diff = torch.where(p > 0, s - log_m, 0.0)  # s - log m
    del log_m
    kl_pm = (p * diff).sum(-1, keepdim=True)  # KL(p || m)
    return diff.sub_(kl_pm).mul_(p).mul_(1.0 - alpha)
