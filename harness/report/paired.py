"""Paired comparisons on the same questions: bootstrap confidence intervals, exact tests, detectable effects.

Why paired: every variant of a study answers the *same* evaluation questions, so the difference between
two variants is best measured question by question. Question difficulty then cancels, and the interval
is far narrower than one from two separate means. The statistics here are pure numpy/scipy on score
matrices; :func:`compare` applies them to a long table of per-question records (one row per variant,
seed, benchmark and question: the trials' ``eval/samples.jsonl``).

Definitions (reports/README.md repeats them):

- per-question difference ``d_q``: the score of the "plus" variants on question ``q`` minus that of the
  "minus" variants, each averaged first over its seeds and, for a contrast of several variants (a
  component's on/off pairs), over the variants of each side;
- the estimate: the mean of ``d_q`` within each benchmark, then the unweighted mean over benchmarks (the
  definition of ``mean.acc``); for one benchmark simply the mean of ``d_q``;
- 95% CI: percentile bootstrap; each replicate resamples the questions with replacement within each
  benchmark (stratified) and, for every variant with several seeds, its seeds with replacement;
- test: McNemar's exact test (binomial on the discordant questions) when two variants with one seed
  each are compared on 0/1 scores; otherwise the sign test on the non-zero ``d_q``; two-sided;
- MDE (minimum detectable effect): ``(z_{1−α/2} + z_{power}) · σ_d / √n`` with α = 5%, power 80%
  (the factor is 2.80), ``σ_d`` the standard deviation of ``d_q`` and ``n`` the number of questions.

Example::

    lo, hi = bootstrap_ci([a], [b], strata)[1:]   # a, b: seeds × questions arrays of 0/1 scores
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

__all__ = [
    "DISCORDANCE",
    "MDE_FACTOR",
    "SEED_SHARE",
    "bootstrap_ci",
    "compare",
    "mde",
    "paired_test",
    "planned_mde",
    "question_se",
    "score_matrices",
]

ALPHA = 0.05
POWER = 0.80
N_BOOT = 2000
# z_{1−α/2} + z_{power} for a two-sided 5% test with 80% power: 1.960 + 0.842
MDE_FACTOR = 2.8016
# A-priori assumptions of planned_mde (stated wherever its number is printed): two variants of one model
# disagree on about a fifth of the questions, and half of that disagreement is seed-to-seed noise that
# averaging over seeds reduces.
DISCORDANCE = 0.2
SEED_SHARE = 0.5


def question_se(scores: Sequence[float]) -> float:
    """Standard error of a benchmark score from its questions: sample std (n − 1) / √n (NaN below 2)."""
    x = np.asarray(scores, dtype=float)
    x = x[np.isfinite(x)]
    return float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")


def _differences(plus: Sequence[np.ndarray], minus: Sequence[np.ndarray]) -> np.ndarray:
    return np.mean([m.mean(axis=0) for m in plus], axis=0) - np.mean([m.mean(axis=0) for m in minus], axis=0)


def _stratified_mean(d: np.ndarray, strata: np.ndarray) -> float:
    return float(np.mean([d[strata == h].mean() for h in np.unique(strata)]))


def bootstrap_ci(
    plus: Sequence[np.ndarray],
    minus: Sequence[np.ndarray],
    strata: np.ndarray | None = None,
    *,
    n_boot: int = N_BOOT,
    level: float = 0.95,
    rng: np.random.Generator | int | None = 0,
) -> tuple[float, float, float]:
    """(estimate, low, high) of the paired difference ``plus − minus`` (module docstring).

    ``plus`` / ``minus``: one seeds × questions score matrix per variant, columns aligned on the same
    questions. ``strata``: the benchmark of each question (None: one stratum).
    """
    rng = np.random.default_rng(rng)
    q = plus[0].shape[1]
    strata = np.zeros(q, dtype=int) if strata is None else np.asarray(strata)
    estimate = _stratified_mean(_differences(plus, minus), strata)
    # Each replicate is a weighted sum: question q drawn C[b, q] times (within its benchmark), each
    # variant's seed s drawn K[b, s] times. So the statistic is Σ_v ±(1/V) Σ_s K[b,s]/S · (C·a @ m_vᵀ)[b,s],
    # with a[q] = 1/(H·n_h): one matrix product per variant instead of n_boot × Q arrays per seed draw.
    levels = np.unique(strata)
    weights = np.zeros((n_boot, q))
    for h in levels:
        cols = np.flatnonzero(strata == h)
        draws = rng.integers(0, len(cols), size=(n_boot, len(cols)))
        flat = (draws + len(cols) * np.arange(n_boot)[:, None]).ravel()
        counts = np.bincount(flat, minlength=n_boot * len(cols)).reshape(n_boot, len(cols))
        weights[:, cols] = counts / (len(cols) * len(levels))
    stats = np.zeros(n_boot)
    for side, sign in ((plus, 1.0), (minus, -1.0)):
        for m in side:
            seeds = m.shape[0]
            per_seed = weights @ m.T  # (n_boot, seeds)
            k = (
                rng.multinomial(seeds, np.full(seeds, 1.0 / seeds), size=n_boot)
                if seeds > 1
                else np.ones((n_boot, 1))
            )
            stats += sign / len(side) * np.sum(k * per_seed, axis=1) / seeds
    tail = (1 - level) / 2
    low, high = np.quantile(stats, [tail, 1 - tail])
    return estimate, float(low), float(high)


def paired_test(plus: Sequence[np.ndarray], minus: Sequence[np.ndarray]) -> tuple[str, float | None]:
    """(test name, two-sided p): McNemar's exact test for two one-seed 0/1 variants, else the sign test."""
    from scipy.stats import binomtest

    binary = all(np.isin(m, (0.0, 1.0)).all() for m in [*plus, *minus])
    if len(plus) == len(minus) == 1 and plus[0].shape[0] == minus[0].shape[0] == 1 and binary:
        a, b = plus[0][0], minus[0][0]
        wins, losses = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
        name = "McNemar exact"
    else:
        d = _differences(plus, minus)
        wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
        name = "sign test"
    if wins + losses == 0:
        return name, None
    return name, float(binomtest(wins, wins + losses, 0.5).pvalue)


def mde(sd: float, n: int) -> float:
    """Smallest paired difference detected with 80% power at the 5% level: 2.80 · σ_d / √n."""
    return MDE_FACTOR * sd / math.sqrt(n) if n > 0 and math.isfinite(sd) else float("nan")


def planned_mde(
    n_questions: int, seeds: int, discordance: float = DISCORDANCE, seed_share: float = SEED_SHARE
) -> float:
    """The MDE before any data, for ``harness run --dry-run``: 0/1 scores, two variants that disagree on a
    share ``discordance`` of the questions (``σ_d² ≈ discordance``), of which ``seed_share`` is seed noise
    that averaging over ``seeds`` seeds per variant divides by the number of seeds."""
    var = discordance * ((1 - seed_share) + seed_share / max(seeds, 1))
    return mde(math.sqrt(var), n_questions)


def score_matrices(
    records: pd.DataFrame, variants: Sequence[str], benchmarks: Sequence[str]
) -> tuple[list[np.ndarray], np.ndarray, list[tuple[str, str]]]:
    """Seeds × questions matrices for ``variants`` on the questions all of them answered.

    ``records``: columns variant, seed, benchmark, question, score. Returns the matrices (in
    ``variants`` order), the stratum (benchmark index) of each column and the (benchmark, question) keys.
    """
    rows = records[records["benchmark"].isin(list(benchmarks)) & records["variant"].isin(list(variants))]
    wide = rows.pivot_table(
        index=["variant", "seed"], columns=["benchmark", "question"], values="score", aggfunc="mean"
    )
    wide = wide.dropna(axis=1, how="any")  # questions some seed of some variant lacks
    keys = sorted(wide.columns, key=lambda bq: (list(benchmarks).index(bq[0]), str(bq[1])))
    wide = wide[keys]
    mats = [wide.loc[v].to_numpy(dtype=float) for v in variants]
    strata = np.array([list(benchmarks).index(b) for b, _ in keys], dtype=int)
    return mats, strata, list(keys)


def compare(
    records: pd.DataFrame,
    plus: Sequence[str],
    minus: Sequence[str],
    benchmarks: Sequence[str],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict | None:
    """The paired comparison of variants ``plus`` against ``minus`` on ``benchmarks`` (stratified).

    Returns ``{"estimate", "ci_low", "ci_high", "test", "p", "n_questions", "seeds", "sd"}`` (``sd``: the
    standard deviation of ``d_q`` per benchmark), or None when the variants share no question.
    """
    present = set(records["variant"])
    if not set(plus) <= present or not set(minus) <= present:
        return None
    mats, strata, keys = score_matrices(records, [*plus, *minus], benchmarks)
    if not keys:
        return None
    p_mats, m_mats = mats[: len(plus)], mats[len(plus) :]
    estimate, low, high = bootstrap_ci(p_mats, m_mats, strata, n_boot=n_boot, rng=seed)
    test, p = paired_test(p_mats, m_mats)
    d = _differences(p_mats, m_mats)
    sd = {
        benchmarks[h]: float(d[strata == h].std(ddof=1)) if np.sum(strata == h) > 1 else float("nan")
        for h in np.unique(strata)
    }
    return {
        "estimate": estimate,
        "ci_low": low,
        "ci_high": high,
        "test": test,
        "p": p,
        "n_questions": {benchmarks[h]: int(np.sum(strata == h)) for h in np.unique(strata)},
        "seeds": {v: int(m.shape[0]) for v, m in zip([*plus, *minus], mats, strict=True)},
        "sd": sd,
    }
