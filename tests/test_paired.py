"""Paired bootstrap CIs, McNemar/sign tests and detectable effects (harness.report.paired)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harness.report.paired import bootstrap_ci, compare, mde, paired_test, planned_mde, question_se

# Joint distribution of (A correct, B correct) per question: A wins 15%, B wins 10% -> true difference 0.05.
_CELLS = np.array([[1, 1], [1, 0], [0, 1], [0, 0]], dtype=float)
_PROBS = np.array([0.45, 0.15, 0.10, 0.30])
TRUE_DIFF = 0.05


def _study(rng: np.random.Generator, sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = sum(sizes)
    pairs = _CELLS[rng.choice(4, size=n, p=_PROBS)]
    strata = np.repeat(np.arange(len(sizes)), sizes)
    return pairs[:, 0][None, :], pairs[:, 1][None, :], strata


def test_bootstrap_ci_covers_the_true_difference_in_95_percent_of_studies():
    rng = np.random.default_rng(2024)
    inside = 0
    for _ in range(400):
        a, b, strata = _study(rng, (150, 100))  # two benchmarks, stratified
        _, lo, hi = bootstrap_ci([a], [b], strata, n_boot=1000, rng=rng)
        inside += lo <= TRUE_DIFF <= hi
    assert 0.93 <= inside / 400 <= 0.97, inside / 400


def test_bootstrap_ci_by_hand_and_width():
    a = np.array([[1, 1, 0, 1, 0, 1, 1, 0]], dtype=float)
    b = np.array([[1, 0, 0, 1, 0, 0, 1, 0]], dtype=float)
    est, lo, hi = bootstrap_ci([a], [b], n_boot=4000)
    assert est == pytest.approx(0.25)
    # d = (0,1,0,0,0,1,0,0): sd 0.463, se 0.164; the percentile interval is about ±1.96 se, cut at 0
    assert lo == pytest.approx(0.0) and 0.45 < hi < 0.65
    # stratified: the unweighted mean of the benchmark means, not the pooled mean
    est, _, _ = bootstrap_ci([a], [b], np.array([0, 0, 0, 0, 0, 0, 1, 1]))
    assert est == pytest.approx((2 / 6 + 0) / 2)


def test_seeds_are_resampled():
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    # three seeds that differ a lot from each other widen the interval beyond the one-seed interval
    seeds = np.stack([base, np.ones(200), base])  # seed means 0.5, 1, 0.5
    _, lo1, hi1 = bootstrap_ci([base[None]], [base[None] * 0], n_boot=2000)
    _, lo3, hi3 = bootstrap_ci([seeds], [base[None] * 0], n_boot=2000)
    assert hi3 - lo3 > 1.5 * (hi1 - lo1)


def test_mcnemar_and_sign_test():
    a = np.array([[1] * 10 + [0] * 2 + [1] * 5], dtype=float)
    b = np.array([[0] * 10 + [1] * 2 + [1] * 5], dtype=float)
    name, p = paired_test([a], [b])
    assert name == "McNemar exact"
    assert p == pytest.approx(0.0386, abs=1e-4)  # binomial(12, 0.5): P(X <= 2) * 2
    name, p = paired_test([np.vstack([a, a])], [b])
    assert name == "sign test" and p == pytest.approx(0.0386, abs=1e-4)
    assert paired_test([a], [a])[1] is None  # no discordant question: no test


def test_mde_and_question_se_by_hand():
    assert mde(0.5, 100) == pytest.approx(2.8016 * 0.05)
    assert question_se([1, 0, 1, 0]) == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)
    # planned: sigma^2 = 0.2 with one seed; three seeds remove two thirds of the seed half
    assert planned_mde(500, 1) == pytest.approx(2.8016 * np.sqrt(0.2 / 500))
    assert planned_mde(500, 3) == pytest.approx(2.8016 * np.sqrt(0.2 * (0.5 + 0.5 / 3) / 500))


def test_compare_on_records_aligns_questions_and_stratifies():
    rows = []
    for variant, scores in (("base", [0, 0, 1, 0, 1]), ("x", [1, 0, 1, 1, 1])):
        for q, s in enumerate(scores):
            rows.append(
                {
                    "variant": variant,
                    "seed": 0,
                    "benchmark": "b1" if q < 3 else "b2",
                    "question": f"q{q}",
                    "score": s,
                }
            )
    rows.append({"variant": "x", "seed": 0, "benchmark": "b2", "question": "only_x", "score": 1})
    records = pd.DataFrame(rows)
    out = compare(records, ["x"], ["base"], ["b1", "b2"])
    assert out["n_questions"] == {"b1": 3, "b2": 2}  # "only_x" is not a shared question
    assert out["estimate"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert out["test"] == "McNemar exact"
    assert compare(records, ["missing"], ["base"], ["b1"]) is None
