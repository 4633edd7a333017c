"""token_divergence / clip_divergence against hand values and an independent numpy/scipy computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import log_softmax as np_log_softmax
from scipy.special import logsumexp as np_logsumexp

from unisd_components.divergence import clip_divergence, token_divergence
from unisd_components.losses import weighted_sequence_mean


def _slow_kl(p: np.ndarray, q: np.ndarray) -> float:
    total = 0.0
    for pv, qv in zip(p, q, strict=True):
        if pv > 0:
            total += pv * (math.log(pv) - math.log(qv))
    return total


def _slow_divergence(s_logps: np.ndarray, t_logps: np.ndarray, alpha: float) -> np.ndarray:
    """Python loops over positions; probabilities, not log-probs, and the explicit mixture."""
    b, t, _ = s_logps.shape
    out = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            ps, pt = np.exp(s_logps[i, j]), np.exp(t_logps[i, j])
            if alpha == 0:
                out[i, j] = _slow_kl(pt, ps)
            elif alpha == 1:
                out[i, j] = _slow_kl(ps, pt)
            else:
                m = (1 - alpha) * ps + alpha * pt
                out[i, j] = alpha * _slow_kl(pt, m) + (1 - alpha) * _slow_kl(ps, m)
    return out


def _random_logps(seed: int, shape=(2, 5, 11), scale: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np_log_softmax(rng.normal(scale=scale, size=shape), axis=-1)


@pytest.mark.parametrize("alpha", [0.0, 1.0, 0.5, 0.1, 0.9])
def test_matches_slow_implementation(alpha):
    s, u = _random_logps(1), _random_logps(2)
    got = token_divergence(torch.tensor(s), torch.tensor(u), alpha)
    assert got.shape == (2, 5)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), _slow_divergence(s, u, alpha), rtol=1e-5, atol=1e-6)


def test_hand_values_two_token_vocab():
    # p_T = (0.5, 0.5), p_S = (0.9, 0.1)
    p_t = torch.tensor([0.5, 0.5]).log().view(1, 1, 2)
    p_s = torch.tensor([0.9, 0.1]).log().view(1, 1, 2)
    forward = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    reverse = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    m = (0.7, 0.3)
    jsd = 0.5 * (0.5 * math.log(0.5 / m[0]) + 0.5 * math.log(0.5 / m[1])) + 0.5 * (
        0.9 * math.log(0.9 / m[0]) + 0.1 * math.log(0.1 / m[1])
    )
    assert token_divergence(p_s, p_t, 0.0).item() == pytest.approx(forward, rel=1e-6)
    assert token_divergence(p_s, p_t, 1.0).item() == pytest.approx(reverse, rel=1e-6)
    assert token_divergence(p_s, p_t, 0.5).item() == pytest.approx(jsd, rel=1e-6)
    assert forward != pytest.approx(reverse)  # the directions really differ


def test_forward_and_reverse_are_swaps_and_jsd_half_is_symmetric():
    s, u = torch.tensor(_random_logps(3)), torch.tensor(_random_logps(4))
    torch.testing.assert_close(token_divergence(s, u, 0.0), token_divergence(u, s, 1.0))
    torch.testing.assert_close(token_divergence(s, u, 0.5), token_divergence(u, s, 0.5))
    # generalized JSD with alpha swaps into 1 - alpha
    torch.testing.assert_close(token_divergence(s, u, 0.2), token_divergence(u, s, 0.8))


def test_jsd_half_equals_explicit_mixture_formula_with_logsumexp():
    s, u = _random_logps(5), _random_logps(6)
    log_m = np_logsumexp(np.stack([s, u]), axis=0) - math.log(2)
    expected = 0.5 * (np.exp(u) * (u - log_m)).sum(-1) + 0.5 * (np.exp(s) * (s - log_m)).sum(-1)
    got = token_divergence(torch.tensor(s), torch.tensor(u), 0.5)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.3])
def test_zero_when_equal(alpha):
    s = torch.tensor(_random_logps(7))
    assert token_divergence(s, s.clone(), alpha).abs().max().item() < 1e-6


def test_jsd_bounded_by_ln2_even_for_disjoint_supports():
    s = torch.tensor(_random_logps(8, scale=30.0))  # near one-hot
    u = torch.tensor(_random_logps(9, scale=30.0))
    d = token_divergence(s, u, 0.5)
    assert (d <= math.log(2) + 1e-6).all()
    disjoint_s = torch.tensor([0.0, -math.inf]).view(1, 1, 2)
    disjoint_t = torch.tensor([-math.inf, 0.0]).view(1, 1, 2)
    assert token_divergence(disjoint_s, disjoint_t, 0.5).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 0.25])
def test_masked_vocab_neg_inf_gives_finite_values_and_gradients(alpha):
    logits_s = torch.randn(2, 5, 11)
    logits_t = torch.randn(2, 5, 11)
    logits_s[..., 8:] = -math.inf  # vocabulary padding masked in both
    logits_t[..., 8:] = -math.inf
    s = logits_s.clone().requires_grad_(True)
    u = logits_t.clone().requires_grad_(True)
    d = token_divergence(s.log_softmax(-1), u.log_softmax(-1), alpha)
    assert torch.isfinite(d).all()
    reference = token_divergence(logits_s[..., :8].log_softmax(-1), logits_t[..., :8].log_softmax(-1), alpha)
    torch.testing.assert_close(d, reference)
    d.sum().backward()
    assert torch.isfinite(s.grad).all() and torch.isfinite(u.grad).all()
    assert s.grad[..., :8].abs().sum() > 0


def test_padding_positions_have_no_effect_on_the_masked_loss():
    s = torch.tensor(_random_logps(10)).requires_grad_(True)
    u = torch.tensor(_random_logps(11))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    loss = weighted_sequence_mean(token_divergence(s, u, 0.0), mask)
    garbage_s = s.detach().clone()
    garbage_u = u.clone()
    garbage_s[0, 3:] = -math.inf  # fully -inf rows at padding: NaN-prone
    garbage_u[0, 3:] = (torch.randn(2, 11, dtype=u.dtype) * 50).log_softmax(-1)  # extreme but valid
    garbage_s.requires_grad_(True)
    loss2 = weighted_sequence_mean(token_divergence(garbage_s, garbage_u, 0.5), mask)
    assert torch.isfinite(loss2)
    loss2.backward()
    assert torch.isfinite(garbage_s.grad).all()
    loss3 = weighted_sequence_mean(token_divergence(garbage_s.detach(), garbage_u, 0.0), mask)
    # forward KL at padding is inf (student -inf where teacher has mass) but is selected away
    assert loss3.item() == pytest.approx(loss.item(), rel=1e-6)


def test_gradient_matches_finite_difference_forward_kl():
    torch.manual_seed(0)
    z = torch.randn(1, 1, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(1, 1, 5, dtype=torch.float64).log_softmax(-1)
    d = token_divergence(z.log_softmax(-1), u, 0.0).sum()
    d.backward()
    # d/dz KL(T || softmax(z)) = softmax(z) - p_T
    expected = z.detach().softmax(-1) - u.exp()
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-5, atol=1e-6)


def test_alpha_out_of_range_raises():
    s = torch.tensor(_random_logps(1))
    with pytest.raises(ValueError):
        token_divergence(s, s, 1.5)


# ---- clipping


def test_clip_static_cap_by_hand():
    d = torch.tensor([[0.5, 12.0, 3.0], [20.0, 1.0, 0.0]], requires_grad=True)
    mask = torch.ones(2, 3, dtype=torch.bool)
    out = clip_divergence(d, mask, cap=10.0)
    assert out.tolist() == [[0.5, 10.0, 3.0], [10.0, 1.0, 0.0]]
    out.sum().backward()
    assert d.grad.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]


def test_clip_adaptive_uses_masked_tokens_only():
    d = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 1000.0, 2000.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = clip_divergence(d, mask, quantile=0.5)
    # masked values 1,2,3,4,5 -> median 3
    expected = np.minimum(d.numpy(), np.quantile([1, 2, 3, 4, 5], 0.5))
    np.testing.assert_allclose(out.numpy(), expected)
    assert out[0, 2].item() == 3.0 and out[1, 0].item() == 3.0


def test_clip_adaptive_matches_numpy_quantile_on_random():
    rng = np.random.default_rng(3)
    d = np.abs(rng.normal(size=(3, 7))) * 4
    mask = rng.random((3, 7)) > 0.3
    out = clip_divergence(torch.tensor(d, dtype=torch.float32), torch.tensor(mask), quantile=0.9)
    cap = np.quantile(d[mask], 0.9)
    np.testing.assert_allclose(out.numpy(), np.minimum(d, cap), rtol=1e-6)
    # the padding values changed nothing: make them huge and the cap is the same
    d2 = d.copy()
    d2[~mask] = 1e6
    out2 = clip_divergence(torch.tensor(d2, dtype=torch.float32), torch.tensor(mask), quantile=0.9)
    np.testing.assert_allclose(out2.numpy()[mask], out.numpy()[mask], rtol=1e-6)


def test_clip_adaptive_cap_is_not_differentiated():
    d = torch.tensor([[1.0, 2.0, 3.0, 4.0]], requires_grad=True)
    mask = torch.ones(1, 4, dtype=torch.bool)
    clip_divergence(d, mask, quantile=0.5).sum().backward()
    # cap = 2.5: tokens below pass gradient 1, clipped ones 0 (a differentiated quantile would give them > 0)
    assert d.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]


def test_clip_needs_exactly_one_mode():
    d = torch.ones(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        clip_divergence(d, mask)
    with pytest.raises(ValueError):
        clip_divergence(d, mask, cap=1.0, quantile=0.5)
