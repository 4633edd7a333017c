"""contrastive_hinge against hand values and loops; gradient only to the student."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unisd_components.contrastive import contrastive_hinge


def test_hand_values():
    s = torch.tensor([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-1.2, -1.0, -0.5]])
    n = torch.tensor([[-3.0, -2.1, -9.0]])
    mask = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    # token 0: relu(0.5 + 0.2 - 2.0) = 0 ; token 1: relu(0.5 + 1.0 - 0.1) = 1.4 ; token 2 padded
    assert contrastive_hinge(s, t, n, mask, margin=0.5).item() == pytest.approx(0.7)
    assert contrastive_hinge(s, t, n, mask, margin=0.0).item() == pytest.approx(0.45)


def test_matches_loop_on_random():
    rng = np.random.default_rng(0)
    s, t, n = (-np.abs(rng.normal(size=(3, 7))) for _ in range(3))
    mask = rng.random((3, 7)) > 0.3
    per_seq = []
    for b in range(3):
        vals = [
            max(0.0, 0.3 + abs(s[b, i] - t[b, i]) - abs(s[b, i] - n[b, i])) for i in range(7) if mask[b, i]
        ]
        per_seq.append(sum(vals) / max(len(vals), 1))
    got = contrastive_hinge(*(torch.tensor(a) for a in (s, t, n)), torch.tensor(mask), margin=0.3)
    assert got.item() == pytest.approx(float(np.mean(per_seq)), rel=1e-6)


def test_gradient_reaches_the_student_only():
    s = torch.tensor([[-2.0, -1.0]], requires_grad=True)
    t = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    n = torch.tensor([[-2.5, -1.1]], requires_grad=True)
    loss = contrastive_hinge(s, t, n, torch.ones(1, 2, dtype=torch.bool), margin=0.5)
    loss.backward()
    assert t.grad is None and n.grad is None
    # token 0: 0.5 + |s-t| - |s-n| = 0.5 + 1 - 0.5 > 0; d/ds = sign(s-t) - sign(s-n) = -1 - 1 = -2, /2 tokens
    assert s.grad[0, 0].item() == pytest.approx(-1.0)
