"""Agreement weights against hand values and a slow numpy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unisd_components.agreement import sequence_agreement_weights, token_agreement_weights
from unisd_components.losses import masked_sequence_means, sequence_weighted_mean, weighted_sequence_mean


def _slow_token_weights(ell, mask, gamma, stat, quantile, cap, floor):
    k, b, t = ell.shape
    d = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            vals = [ell[c, i, j] for c in range(k)]
            if stat == "var":
                mu = sum(vals) / k
                d[i, j] = sum((v - mu) ** 2 for v in vals) / k
            else:
                d[i, j] = max(vals) - min(vals)
    q = max(np.quantile(d[mask], quantile), 1e-6)
    w = np.zeros((b, t))
    for i in range(b):
        for j in range(t):
            if mask[i, j]:
                dn = min(d[i, j] / q, cap)
                w[i, j] = max(1.0 / (1.0 + gamma * dn), floor)
    return w


def _slow_sequence_weights(ell, mask, gamma, stat):
    k, b, _ = ell.shape
    out = []
    for i in range(b):
        s = [ell[c, i][mask[i]].mean() for c in range(k)]
        d = np.var(s) if stat == "var" else max(s) - min(s)
        out.append(max(math.exp(-gamma * d), 1e-6))
    return np.array(out)


def _random_case(seed):
    rng = np.random.default_rng(seed)
    ell = -np.abs(rng.normal(size=(3, 2, 5))) * 2
    mask = np.ones((2, 5), dtype=bool)
    mask[0, 3:] = False
    return ell, mask


@pytest.mark.parametrize("stat", ["var", "range"])
@pytest.mark.parametrize("gamma", [1.0, 0.001, 5.0])
def test_token_weights_match_slow(stat, gamma):
    ell, mask = _random_case(0)
    got = token_agreement_weights(torch.tensor(ell), torch.tensor(mask), gamma, stat=stat, quantile=0.95)
    expected = _slow_token_weights(ell, mask, gamma, stat, 0.95, 10.0, 0.01)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5, atol=1e-7)


def test_token_weights_hand_values_cap_and_floor():
    # K=2, B=1, T=3: log-probs (0,0), (0,-2), (0,-20) -> var 0, 1, 100
    ell = torch.tensor([[[0.0, 0.0, 0.0]], [[0.0, -2.0, -20.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    # quantile 0.5 of {0, 1, 100} = 1 -> d~ = 0, 1, min(100, 10) = 10
    w = token_agreement_weights(ell, mask, gamma=1.0, quantile=0.5, cap=10.0, floor=0.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.5, 1.0 / 11.0]]))
    # gamma 50: 1/51 stays, 1/501 is floored at 0.01
    w = token_agreement_weights(ell, mask, gamma=50.0, quantile=0.5, cap=10.0, floor=0.01)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0 / 51.0, 0.01]]))


def test_token_weights_quantile_over_masked_only_and_padding_is_zero():
    ell, mask = _random_case(1)
    w1 = token_agreement_weights(torch.tensor(ell), torch.tensor(mask), 1.0)
    ell2 = ell.copy()
    ell2[:, 0, 3:] = np.array([[-math.inf, 5.0], [0.0, -1e9], [3.0, 7.0]])  # garbage at padding
    w2 = token_agreement_weights(torch.tensor(ell2), torch.tensor(mask), 1.0)
    torch.testing.assert_close(w1, w2)
    assert (w1[0, 3:] == 0).all() and (w1[torch.tensor(mask)] > 0).all()


def test_token_weights_normaliser_floor_when_all_agree():
    ell = torch.full((3, 2, 4), -1.5)
    w = token_agreement_weights(ell, torch.ones(2, 4, dtype=torch.bool), gamma=1.0)
    assert torch.equal(w, torch.ones(2, 4))


def test_weights_carry_no_gradient():
    ell = torch.randn(3, 2, 5, requires_grad=True)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert not token_agreement_weights(ell, mask, 1.0).requires_grad
    assert not sequence_agreement_weights(ell, mask, 1.0).requires_grad


@pytest.mark.parametrize("stat", ["var", "range"])
def test_sequence_weights_match_slow(stat):
    ell, mask = _random_case(2)
    got = sequence_agreement_weights(torch.tensor(ell), torch.tensor(mask), 0.7, stat=stat)
    np.testing.assert_allclose(got.numpy(), _slow_sequence_weights(ell, mask, 0.7, stat), rtol=1e-6)


def test_sequence_weights_hand_values_and_floor():
    # B=1, T=2, K=2: means -1 and -3 -> population variance 1, range 2
    ell = torch.tensor([[[-1.0, -1.0]], [[-2.0, -4.0]]])
    mask = torch.ones(1, 2, dtype=torch.bool)
    assert sequence_agreement_weights(ell, mask, 0.5).item() == pytest.approx(math.exp(-0.5))
    assert sequence_agreement_weights(ell, mask, 0.5, stat="range").item() == pytest.approx(math.exp(-1.0))
    assert sequence_agreement_weights(ell, mask, 1000.0).item() == pytest.approx(1e-6)


def test_sequence_level_weights_do_not_cancel():
    """The reference folds w_b into the token normaliser, where it cancels; ours changes the loss."""
    ell = torch.tensor([[[-1.0, -1.0], [-1.0, -1.0]], [[-1.0, -1.0], [-3.0, -3.0]]])  # K=2, B=2, T=2
    mask = torch.ones(2, 2, dtype=torch.bool)
    w_b = sequence_agreement_weights(ell, mask, gamma=1.0)
    assert w_b[0].item() == 1.0 and w_b[1].item() == pytest.approx(math.exp(-1.0))
    per_token = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    ours = sequence_weighted_mean(masked_sequence_means(per_token, mask), w_b)
    # reference: tokens weighted by w_b, normalised by Σ mask·w_b per sequence -> w_b cancels
    folded = (per_token * w_b[:, None]).sum(-1) / (w_b[:, None] * mask).sum(-1)
    unweighted = weighted_sequence_mean(per_token, mask)
    assert folded.mean().item() == pytest.approx(unweighted.item())
    assert ours.item() == pytest.approx((1.0 + math.exp(-1.0) * 3.0) / 2)
    assert ours.item() < unweighted.item() - 0.5


def test_needs_two_contexts_and_known_stat():
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError):
        token_agreement_weights(torch.zeros(1, 1, 2), mask, 1.0)
    with pytest.raises(ValueError):
        sequence_agreement_weights(torch.zeros(2, 1, 2), mask, 1.0, stat="std")
