"""weighted_sequence_mean / sequence_weighted_mean against hand values and loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from unisd_components.losses import masked_sequence_means, sequence_weighted_mean, weighted_sequence_mean


def test_hand_values_unweighted():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # sequence means 1.5 and 5.0 -> batch mean 3.25 (a token mean would give 18/5 = 3.6)
    assert masked_sequence_means(x, mask).tolist() == [1.5, 5.0]
    assert weighted_sequence_mean(x, mask).item() == pytest.approx(3.25)


def test_hand_values_weighted_and_denominator_floor():
    x = torch.tensor([[2.0, 4.0, 100.0], [1.0, 3.0, 5.0]])
    w = torch.tensor([[1.0, 3.0, 7.0], [0.1, 0.1, 0.1]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    # seq 0: (2 + 12) / 4 = 3.5 ; seq 1: Σw = 0.3 < 1 -> (0.1 + 0.3 + 0.5) / 1 = 0.9
    got = masked_sequence_means(x, mask, w)
    torch.testing.assert_close(got, torch.tensor([3.5, 0.9]))
    assert weighted_sequence_mean(x, mask, w).item() == pytest.approx(2.2)


def test_matches_loop_on_random():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 7))
    w = rng.random((3, 7)) * 3
    mask = rng.random((3, 7)) > 0.4
    mask[2] = False  # an all-padding sequence counts as 0
    expected = []
    for b in range(3):
        num = sum(w[b, t] * x[b, t] for t in range(7) if mask[b, t])
        den = sum(w[b, t] for t in range(7) if mask[b, t])
        expected.append(num / max(den, 1.0))
    got = weighted_sequence_mean(torch.tensor(x), torch.tensor(mask), torch.tensor(w))
    assert got.item() == pytest.approx(float(np.mean(expected)), rel=1e-6)
    assert expected[2] == 0.0


def test_padding_nan_and_inf_do_not_leak():
    x = torch.tensor([[1.0, math.nan, math.inf]], requires_grad=True)
    w = torch.tensor([[1.0, math.nan, 2.0]])
    mask = torch.tensor([[1, 0, 0]], dtype=torch.bool)
    loss = weighted_sequence_mean(x, mask, w)
    assert loss.item() == 1.0
    loss.backward()
    assert x.grad.tolist() == [[1.0, 0.0, 0.0]]


def test_sequence_weighted_mean_hand_value():
    per_seq = torch.tensor([2.0, 4.0])
    assert sequence_weighted_mean(per_seq, torch.tensor([0.5, 1.0])).item() == pytest.approx(2.5)
    assert sequence_weighted_mean(per_seq).item() == pytest.approx(3.0)


def test_sequence_weights_do_not_cancel_unlike_folding_into_the_token_normaliser():
    x = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    mask = torch.ones(2, 2, dtype=torch.bool)
    seq_w = torch.tensor([1.0, 0.1])
    ours = sequence_weighted_mean(masked_sequence_means(x, mask), seq_w)
    # the reference folds w_b into every token of sequence b and normalises by Σ mask·w_b: it cancels
    # (when Σ mask·w_b >= 1), so the result is the unweighted loss
    folded = weighted_sequence_mean(x, mask, seq_w[:, None].expand_as(x).contiguous() * 10)
    unweighted = weighted_sequence_mean(x, mask)
    assert folded.item() == pytest.approx(unweighted.item())
    assert ours.item() == pytest.approx((1.0 * 1.0 + 0.1 * 3.0) / 2)
    assert ours.item() != pytest.approx(unweighted.item())
