"""Two-level designs of the component subsets: full factorials and regular 2^(k−p) fractions.

Why a module of its own: the plan (which subsets to train), ``--dry-run`` (what the design can tell
apart) and the report (which effects a set of rows identifies, and their estimates) must agree on one
definition of a design. Everything here is pure: factor names and 0/1 runs in, numbers out.

Conventions:

- A run is a tuple of 0/1 settings in factor order (1: the component is on). In ±1 coding ``x = 2z − 1``.
- A *word* is a set of factors, held as a bitmask (bit ``i``: factor ``i``); the product of their ±1
  columns is the word's column. A regular fraction is the set of runs on which every word of its
  *defining relation* has a constant column ``s_w = ±1`` ("I = s_w·w").
- The fractions planned here contain the empty subset (plain SDFT, every factor at −1), so that SDFT is a
  design point: each defining word then has sign ``(−1)^|w|``, i.e. an even number of its components on.
- Resolution: the length of the shortest defining word. Resolution V leaves every main effect and pair
  interaction aliased only with interactions of three or more factors; IV leaves main effects clear of
  pair interactions but pairs aliased with pairs; III aliases main effects with pair interactions.
- Aliases: in the fraction, term ``t``'s column equals ``s_w`` times the column of ``t ⊕ w`` for every
  defining word ``w``, so a least-squares estimate of ``t`` estimates ``t + Σ s_w·(t ⊕ w)``.

Example::

    d = fractional_design(["a", "b", "c", "d", "e"], resolution=5)
    d.n_runs, d.resolution, d.relation()     # 16, 5, 'I = −a×b×c×d×e'
    d.alias_chain(d.mask(["a"]))             # 'a − b×c×d×e'
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Design",
    "MAX_FACTORS",
    "TermEstimate",
    "fit_terms",
    "fractional_design",
    "full_design",
    "recognise_design",
]

# Enumerating candidate generators and all 2^k runs stays instant up to here (the study has five components).
MAX_FACTORS = 10


def _popcount(x: int) -> int:
    return bin(x).count("1")


@dataclass(frozen=True)
class Design:
    """A full factorial (``words == ()``) or a regular fraction of ``factors``.

    ``words``: the defining relation without ``I``, as ``(bitmask, sign)`` pairs (the whole defining
    contrast subgroup, ``2^p − 1`` words). ``runs``: the design points, 0/1 per factor.
    """

    factors: tuple[str, ...]
    words: tuple[tuple[int, int], ...]
    runs: tuple[tuple[int, ...], ...]

    @property
    def k(self) -> int:
        return len(self.factors)

    @property
    def p(self) -> int:
        return (len(self.words) + 1).bit_length() - 1

    @property
    def n_runs(self) -> int:
        return len(self.runs)

    @property
    def is_full(self) -> bool:
        return not self.words

    @property
    def resolution(self) -> int | None:
        """Shortest defining word; None for a full factorial (nothing is aliased)."""
        return min(_popcount(w) for w, _ in self.words) if self.words else None

    def name(self) -> str:
        """``2^5 full factorial`` or ``2^(5−1) fraction, resolution V``."""
        if self.is_full:
            return f"2^{self.k} full factorial"
        roman = {2: "II", 3: "III", 4: "IV", 5: "V", 6: "VI", 7: "VII"}.get(
            self.resolution or 0, str(self.resolution)
        )
        return f"2^({self.k}−{self.p}) fraction, resolution {roman}"

    def mask(self, names: Sequence[str]) -> int:
        return sum(1 << self.factors.index(n) for n in names)

    def term(self, mask: int) -> str:
        """``a×c`` for the mask of {a, c}; ``I`` for the empty word (the mean)."""
        names = [f for i, f in enumerate(self.factors) if mask >> i & 1]
        return "×".join(names) if names else "I"

    def relation(self) -> str:
        """The defining relation, ``I = +a×b×c×d×e`` (``I`` alone for a full factorial)."""
        ordered = sorted(self.words, key=lambda ws: (_popcount(ws[0]), ws[0]))
        return "I" + "".join(f" = {'+' if s > 0 else '−'}{self.term(w)}" for w, s in ordered)

    def aliases(self, mask: int) -> list[tuple[int, int]]:
        """The terms aliased with ``mask`` as ``(mask, sign)``, shortest first (the term itself excluded)."""
        out = [(mask ^ w, s) for w, s in self.words]
        return sorted(out, key=lambda ms: (_popcount(ms[0]), ms[0]))

    def alias_chain(self, mask: int, max_order: int | None = None) -> str:
        """``a + b×c×d×e``: what a least-squares estimate of ``mask`` estimates (up to ``max_order``)."""
        parts = [self.term(mask)]
        for m, s in self.aliases(mask):
            if max_order is None or _popcount(m) <= max_order:
                parts.append(f"{'+' if s > 0 else '−'} {self.term(m)}")
        return " ".join(parts)

    def identifies(self, mask: int, among: Sequence[int]) -> bool:
        """True when ``mask`` is aliased with none of ``among`` (nor with the mean)."""
        aliased = {m for m, _ in self.aliases(mask)}
        return 0 not in aliased and not aliased & {a for a in among if a != mask}


def _runs_of(k: int, words: Sequence[tuple[int, int]]) -> tuple[tuple[int, ...], ...]:
    runs = []
    for z in itertools.product((0, 1), repeat=k):
        bits = sum(v << i for i, v in enumerate(z))
        # word column on run z: Π(2z_i − 1) = (−1)^(|w| − |z∧w|)
        if all((-1) ** (_popcount(w) - _popcount(bits & w)) == s for w, s in words):
            runs.append(tuple(z))
    return tuple(sorted(runs, key=lambda r: (sum(r), r[::-1])))


def _check_factors(factors: Sequence[str]) -> tuple[str, ...]:
    factors = tuple(factors)
    if not factors:
        raise ValueError("a design needs at least one factor")
    if len(set(factors)) != len(factors):
        raise ValueError(f"factors listed twice: {', '.join(factors)}")
    if len(factors) > MAX_FACTORS:
        raise ValueError(f"at most {MAX_FACTORS} factors (got {len(factors)})")
    return factors


def full_design(factors: Sequence[str]) -> Design:
    """All ``2^k`` runs."""
    factors = _check_factors(factors)
    return Design(factors, (), _runs_of(len(factors), ()))


def _group(generators: Sequence[int]) -> list[int]:
    words = {0}
    for g in generators:
        words |= {w ^ g for w in words}
    return sorted(words - {0})


def fractional_design(factors: Sequence[str], resolution: int) -> Design:
    """The smallest regular fraction of resolution ≥ ``resolution`` (3, 4 or 5), minimum aberration.

    The first ``k − p`` factors form a full factorial; each further factor is set to the product of a word
    of them (its generator). Among the generator sets of the largest ``p`` that reach the resolution, the
    one with the fewest shortest words is taken (minimum aberration), so as few pair interactions as
    possible share an alias chain. When no fraction reaches the resolution, the full factorial is returned.
    The fraction is the one that contains the empty subset (see the module docstring).
    """
    factors = _check_factors(factors)
    if resolution not in (3, 4, 5):
        raise ValueError(f"resolution must be 3, 4 or 5 (got {resolution})")
    k = len(factors)
    for p in range(k - 1, 0, -1):
        m = k - p
        candidates = [w for w in range(1, 1 << m) if _popcount(w) >= 2]
        best: tuple[tuple[int, ...], list[int]] | None = None
        for gens in itertools.combinations(candidates, p):
            generators = [g | 1 << (m + j) for j, g in enumerate(gens)]
            words = _group(generators)
            lengths = sorted(_popcount(w) for w in words)
            if lengths[0] < resolution:
                continue
            pattern = tuple(lengths.count(n) for n in range(resolution, k + 1))
            if best is None or pattern < best[0]:
                best = (pattern, words)
        if best is not None:
            signed = tuple((w, (-1) ** _popcount(w)) for w in best[1])
            return Design(factors, signed, _runs_of(k, signed))
    return full_design(factors)


def recognise_design(runs: Sequence[Sequence[int]], factors: Sequence[str]) -> Design | None:
    """The design the distinct ``runs`` (0/1 per factor) form: the full factorial, a regular fraction
    (any of its cosets, not only the one with the empty subset), or None when they are neither."""
    factors = _check_factors(factors)
    k = len(factors)
    points = sorted({tuple(int(v) for v in r) for r in runs})
    n = len(points)
    if n < 2 or n & (n - 1) or n > 1 << k:
        return None
    bits = np.array([sum(v << i for i, v in enumerate(r)) for r in points], dtype=np.int64)
    words: list[tuple[int, int]] = []
    for w in range(1, 1 << k):
        parity = {_popcount(int(b) & w) % 2 for b in bits}
        if len(parity) == 1:
            words.append((w, (-1) ** (_popcount(w) - parity.pop())))
    if len(words) + 1 != (1 << k) // n:
        return None
    return Design(factors, tuple(words), tuple(sorted(points, key=lambda r: (sum(r), r[::-1]))))


@dataclass(frozen=True)
class TermEstimate:
    """One main effect or pair interaction from :func:`fit_terms`, in the report's units.

    ``estimate``: for a main effect, the mean with the component on minus the mean with it off (twice
    the ±1 coefficient); for a pair ``a×b``, a's effect with b on minus a's effect with b off (four times
    the coefficient). ``chain``: the alias chain the estimate stands for (what else it contains, assumed
    negligible). ``aliased_with``: the lower-order term this one cannot be told apart from (then no
    estimate of its own), or None.
    """

    term: str
    order: int
    estimate: float | None
    se: float | None
    ci_low: float | None
    ci_high: float | None
    chain: str
    aliased_with: str | None


def fit_terms(
    design: Design,
    z: np.ndarray,
    y: np.ndarray,
    se: np.ndarray | None = None,
    level: float = 0.95,
) -> tuple[list[TermEstimate], dict]:
    """Least-squares fit of the mean, main effects and pair interactions on the ±1-coded rows.

    ``z``: rows × factors, 0/1 (every row a run of ``design``; several rows per run are replicates, e.g.
    seeds). ``y``: the metric per row. ``se``: optional per-row standard errors (from the questions).
    Each alias class among the mean, main effects and pairs is fitted once, through its lowest-order
    member; the other members are reported as aliased with it. Confidence intervals: Student's t on the
    residual variance when replicates leave residual degrees of freedom; otherwise, with ``se``, a normal
    interval from the per-row standard errors; otherwise none. Returns ``(terms, info)``; ``info`` says
    which error was used (``"error"``), ``df_resid`` and ``n_rows``.
    """
    from scipy import stats

    z = np.asarray(z, dtype=float)
    y = np.asarray(y, dtype=float)
    k = design.k
    x = 2.0 * z - 1.0
    masks = [1 << i for i in range(k)] + [(1 << i) | (1 << j) for i, j in itertools.combinations(range(k), 2)]
    chosen: dict[int, int] = {}  # alias class (min member) -> fitted mask
    aliased: dict[int, int | None] = {}
    for m in masks:
        members = {m} | {a for a, _ in design.aliases(m)}
        if 0 in members:
            aliased[m] = None  # aliased with the mean
            continue
        key = min(members)
        if key in chosen:
            aliased[m] = chosen[key]
        else:
            chosen[key] = m
    fitted = list(chosen.values())
    columns = [np.ones(len(y))] + [np.prod(x[:, [i for i in range(k) if m >> i & 1]], axis=1) for m in fitted]
    X = np.column_stack(columns)
    xtx_inv = np.linalg.pinv(X.T @ X)
    beta = xtx_inv @ X.T @ y
    resid = y - X @ beta
    df_resid = len(y) - X.shape[1]
    rss = float(resid @ resid)
    scale = 2.0 ** np.array([0] + [_popcount(m) for m in fitted], dtype=float)
    cov = None
    error = "none: one row per run and no per-question standard errors"
    dist = None
    if df_resid >= 1 and rss > 1e-12 * max(float(np.sum((y - y.mean()) ** 2)), 1e-300):
        cov = rss / df_resid * xtx_inv
        error = f"replicate rows (residual, {df_resid} df)"
        dist = stats.t(df_resid)
    elif se is not None and np.all(np.isfinite(se)):
        h = xtx_inv @ X.T
        cov = h @ np.diag(np.asarray(se, dtype=float) ** 2) @ h.T
        error = "per-question standard errors of each row (no replicates)"
        dist = stats.norm()
    q = float(dist.ppf(0.5 + level / 2)) if dist is not None else None
    out: list[TermEstimate] = []
    position = {m: 1 + i for i, m in enumerate(fitted)}
    for m in masks:
        chain = design.alias_chain(m)
        if m in position:
            j = position[m]
            est = float(beta[j] * scale[j])
            sd = float(np.sqrt(cov[j, j]) * scale[j]) if cov is not None else None
            lo, hi = (est - q * sd, est + q * sd) if sd is not None and q is not None else (None, None)
            out.append(TermEstimate(design.term(m), _popcount(m), est, sd, lo, hi, chain, None))
        else:
            other = aliased[m]
            with_ = "the mean" if other is None else design.term(other)
            out.append(TermEstimate(design.term(m), _popcount(m), None, None, None, None, chain, with_))
    return out, {"error": error, "df_resid": int(df_resid), "n_rows": int(len(y))}
