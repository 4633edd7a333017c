"""hidden_state_mse: value by hand and by loops, masking, no gradient to the teacher."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisd_components.feature_matching import hidden_state_mse


def test_hand_value():
    hs = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    ht = torch.tensor([[[0.0, 0.0], [5.0, 5.0]]])
    mask = torch.tensor([[1, 0]], dtype=torch.bool)
    assert hidden_state_mse(hs, ht, mask).item() == pytest.approx((1 + 4) / 2)


def test_matches_loop_on_random():
    rng = np.random.default_rng(0)
    hs, ht = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    per_seq = [
        np.mean([np.mean((hs[b, t] - ht[b, t]) ** 2) for t in range(5) if mask[b, t]]) for b in range(2)
    ]
    got = hidden_state_mse(torch.tensor(hs), torch.tensor(ht), torch.tensor(mask))
    assert got.item() == pytest.approx(float(np.mean(per_seq)), rel=1e-6)


def test_teacher_gets_no_gradient_student_does():
    hs = torch.randn(2, 3, 4, requires_grad=True)
    ht = torch.randn(2, 3, 4, requires_grad=True)
    loss = hidden_state_mse(hs, ht, torch.ones(2, 3, dtype=torch.bool))
    loss.backward()
    assert ht.grad is None
    expected = 2 * (hs.detach() - ht.detach()) / 4 / 3 / 2
    torch.testing.assert_close(hs.grad, expected)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        hidden_state_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2, dtype=torch.bool))
