"""Regular fractions, defining relations, alias chains and the least-squares fit (harness.design)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from harness.design import fit_terms, fractional_design, full_design, recognise_design

FIVE = ("agreement", "contrastive", "ema", "feature_matching", "clipping")


def _balanced(design, order: int) -> bool:
    """Every product of up to ``order`` distinct ±1 columns sums to zero over the runs."""
    x = 2 * np.array(design.runs) - 1
    for r in range(1, order + 1):
        for cols in itertools.combinations(range(design.k), r):
            if np.prod(x[:, list(cols)], axis=1).sum() != 0:
                return False
    return True


def test_resolution_five_half_fraction_of_five_components():
    d = fractional_design(FIVE, 5)
    assert (d.n_runs, d.p, d.resolution) == (16, 1, 5)
    assert d.relation() == "I = −agreement×contrastive×ema×feature_matching×clipping"
    assert (0, 0, 0, 0, 0) in d.runs  # plain SDFT is a design point
    # every run switches an even number of components on (the defining word has sign (−1)^5)
    assert all(sum(r) % 2 == 0 for r in d.runs)
    # main effects and pair interactions are orthogonal to each other: a resolution-V fraction
    assert _balanced(d, 4) and not _balanced(d, 5)
    assert d.alias_chain(d.mask(["ema"])) == "ema − agreement×contrastive×feature_matching×clipping"
    assert (
        d.alias_chain(d.mask(["agreement", "ema"])) == "agreement×ema − contrastive×feature_matching×clipping"
    )
    assert d.name() == "2^(5−1) fraction, resolution V"


def test_resolution_three_and_four():
    d3 = fractional_design("abcde", 3)
    assert (d3.n_runs, d3.resolution) == (8, 3)
    assert len(d3.words) == 3  # 2^2 − 1 words in the defining relation
    # a main effect shares its chain with pair interactions
    assert any(bin(m).count("1") == 2 for m, _ in d3.aliases(d3.mask("a")))
    d4 = fractional_design("abcdef", 4)
    assert (d4.n_runs, d4.resolution) == (16, 4)  # 2^(6−2)
    assert _balanced(d4, 3)
    # resolution IV: no main effect is aliased with a pair, some pair is aliased with a pair
    assert all(bin(m).count("1") >= 3 for i in range(6) for m, _ in d4.aliases(1 << i))
    assert any(bin(m).count("1") == 2 for m, _ in d4.aliases(d4.mask("ab")))


def test_no_fraction_reaches_the_resolution_gives_the_full_factorial():
    d = fractional_design("abc", 5)
    assert d.is_full and d.n_runs == 8 and d.relation() == "I"


def test_recognise_full_fraction_and_neither():
    assert recognise_design(full_design("abcd").runs, "abcd").is_full
    half = fractional_design(FIVE, 5)
    got = recognise_design(list(reversed(half.runs)) * 2, FIVE)  # order and replicates do not matter
    assert got is not None and got.words == half.words
    # the other half (a coset without the empty subset) is recognised too, with the opposite sign
    other = [r for r in full_design(FIVE).runs if r not in half.runs]
    assert (
        recognise_design(other, FIVE).relation() == "I = +agreement×contrastive×ema×feature_matching×clipping"
    )
    assert recognise_design(half.runs[:15], FIVE) is None
    assert recognise_design(full_design("abc").runs[:4], "abc") is None  # 4 runs, but not a regular fraction


def _planted(z: np.ndarray) -> np.ndarray:
    """Main effects 0.1, −0.05, 0.02, 0, 0.03 and interaction a×c = 0.04 in the report's units (on-minus-off
    averaged over the other factors): ±1 coefficients are half and a quarter of them."""
    x = 2 * z - 1
    main = np.array([0.1, -0.05, 0.02, 0.0, 0.03])
    return 0.5 + x @ main / 2 + 0.04 / 4 * x[:, 0] * x[:, 2]


def test_fit_recovers_planted_effects_with_replicates_and_per_question_errors():
    d = fractional_design(FIVE, 5)
    z = np.array(d.runs * 3, dtype=float)
    rng = np.random.default_rng(1)
    y = _planted(z) + rng.normal(0, 0.01, len(z))
    terms, info = fit_terms(d, z, y)
    assert info["df_resid"] == 48 - 16 and "replicate" in info["error"]
    truth = {**dict(zip(FIVE, (0.1, -0.05, 0.02, 0.0, 0.03), strict=True)), "agreement×ema": 0.04}
    assert len(terms) == 15 and all(t.aliased_with is None for t in terms)
    for t in terms:  # within four standard errors of the truth (0 for the pairs not planted)
        assert abs(t.estimate - truth.get(t.term, 0.0)) < 4 * t.se
        assert t.ci_high - t.ci_low == pytest.approx(2 * 2.037 * t.se, rel=1e-3)  # t(32) quantile
    # one row per run: no residual, the per-question standard errors give the interval
    z1 = np.array(d.runs, dtype=float)
    terms, info = fit_terms(d, z1, _planted(z1), se=np.full(16, 0.02))
    assert "per-question" in info["error"]
    t = {t.term: t for t in terms}["agreement"]
    assert t.estimate == pytest.approx(0.1) and t.se == pytest.approx(2 * 0.02 / 4)  # 2·σ/√16


def test_fit_reports_aliased_pairs_in_a_resolution_three_fraction():
    d = fractional_design("abcde", 3)
    z = np.array(d.runs, dtype=float)
    terms, info = fit_terms(d, z, z @ np.arange(1.0, 6.0))
    by = {t.term: t for t in terms}
    assert by["a"].estimate == pytest.approx(1.0)
    assert "CI" not in info["error"] and by["a"].ci_low is None  # no replicates, no standard errors
    aliased = [t for t in terms if t.aliased_with is not None]
    assert aliased and all(t.estimate is None for t in aliased)
