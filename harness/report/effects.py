"""Component effects from a factorial results table: main effects, Shapley values, pair interactions, ANOVA.

Every quantity is computed on the subset means ``v(S)``: the metric averaged first over the replicate rows
(seeds, and in a search study the hyperparameter draws) of one component subset ``S``, then combined over
subsets. Averaging per subset first gives every subset the same weight whatever its number of seeds, so
the definitions below are the textbook ones for a 2^n design:

- main effect of ``i``: mean of ``v(S ∪ {i}) − v(S)`` over all ``S ⊆ N \\ {i}`` (equal, on a complete
  factorial, to the mean over subsets with ``i`` minus the mean over subsets without it);
- Shapley value of ``i``: ``Σ_{S ⊆ N\\{i}} |S|!(n−|S|−1)!/n! · (v(S ∪ {i}) − v(S))``, exact;
- interaction ``a×b``: ``[v(T+a+b) − v(T+b)] − [v(T+a) − v(T)]`` averaged over all settings ``T`` of the
  other components (the effect of ``a`` with ``b`` on minus its effect with ``b`` off).

An incomplete factorial gives no number for a quantity whose definition needs a missing subset: it is
reported as not identifiable (``None``), together with the conditional estimate over the contexts that
are present (``matched_pairs`` / ``matched_quads``), which is labelled as such and never passed off as the
main effect or interaction.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.errors import HarnessError

__all__ = [
    "analyse_effects",
    "complete_rows",
    "format_subset",
    "pair_key",
    "subset_means",
]

Subset = tuple[int, ...]

# Relative residual sum of squares under which the OLS fit is exact: F statistics would be infinite or
# undefined, so p-values are omitted instead of printed as 0.
_EXACT_FIT_RTOL = 1e-12


def pair_key(a: str, b: str) -> str:
    """The key of a pair interaction in effects.json: ``"a×b"`` in the order of the components argument."""
    return f"{a}×{b}"


def format_subset(subset: Subset, components: Sequence[str]) -> str:
    """``(1, 0, 1)`` -> ``"{a, c}"``; the empty subset is ``"{}"``."""
    return "{" + ", ".join(c for c, on in zip(components, subset, strict=True) if on) + "}"


def complete_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Only finished trials count: rows whose ``state`` is COMPLETE (every row when there is no state column)."""
    if "state" not in df.columns:
        return df
    return df[df["state"].astype(str).str.upper() == "COMPLETE"]


def _check_columns(df: pd.DataFrame, components: Sequence[str], metric: str) -> None:
    if not components:
        raise HarnessError("no components given: name at least one 0/1 component column")
    if len(set(components)) != len(components):
        raise HarnessError(f"components listed twice: {', '.join(components)}")
    missing = [c for c in [*components, metric] if c not in df.columns]
    if missing:
        raise HarnessError(
            f"column(s) {', '.join(missing)} not in the results table (columns: {', '.join(map(str, df.columns))})"
        )
    for c in components:
        values = set(pd.to_numeric(df[c], errors="coerce").dropna().unique().tolist())
        if not values <= {0, 1} or df[c].isna().any():
            raise HarnessError(
                f"component column {c!r} must hold only 0/1 values (got {sorted(map(str, values))})"
            )


def subset_means(df: pd.DataFrame, components: Sequence[str], metric: str) -> pd.DataFrame:
    """One row per component subset present: the subset key, its seed-mean ``v``, its std and row count.

    Only COMPLETE rows with a finite metric value count. Index: the subset as a tuple of 0/1 ints in the
    order of ``components``.
    """
    _check_columns(df, components, metric)
    rows = complete_rows(df)
    values = pd.to_numeric(rows[metric], errors="coerce")
    rows = rows.assign(_y=values)[np.isfinite(values.to_numpy(dtype=float, na_value=np.nan))]
    keys = [tuple(int(x) for x in r) for r in rows[list(components)].to_numpy()]
    grouped = pd.DataFrame({"subset": keys, "y": rows["_y"].to_numpy(dtype=float)}).groupby("subset")["y"]
    out = pd.DataFrame({"v": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.size()})
    out.index.name = "subset"
    return out


def _with(context: Subset, positions: Sequence[int], values: Sequence[int], n: int) -> Subset:
    """Insert ``values`` at ``positions`` into the settings of the other components (``context``)."""
    full: list[int] = []
    it = iter(context)
    fixed = dict(zip(positions, values, strict=True))
    for k in range(n):
        full.append(fixed[k] if k in fixed else next(it))
    return tuple(full)


def _main_effects(v: dict[Subset, float], components: Sequence[str]) -> tuple[dict, dict]:
    n = len(components)
    main: dict[str, float | None] = {}
    matched: dict[str, dict] = {}
    for i, c in enumerate(components):
        diffs = []
        for ctx in itertools.product((0, 1), repeat=n - 1):
            on, off = _with(ctx, [i], [1], n), _with(ctx, [i], [0], n)
            if on in v and off in v:
                diffs.append(v[on] - v[off])
        total = 2 ** (n - 1)
        value = float(np.mean(diffs)) if diffs else None
        main[c] = value if len(diffs) == total else None
        matched[c] = {"value": value, "pairs": len(diffs), "of": total}
    return main, matched


def _interactions(v: dict[Subset, float], components: Sequence[str]) -> tuple[dict, dict]:
    n = len(components)
    inter: dict[str, float | None] = {}
    matched: dict[str, dict] = {}
    for i, j in itertools.combinations(range(n), 2):
        diffs = []
        for ctx in itertools.product((0, 1), repeat=n - 2):
            corners = [_with(ctx, [i, j], [a, b], n) for a, b in ((1, 1), (0, 1), (1, 0), (0, 0))]
            if all(s in v for s in corners):
                v11, v01, v10, v00 = (v[s] for s in corners)
                diffs.append((v11 - v01) - (v10 - v00))
        total = 2 ** (n - 2)
        value = float(np.mean(diffs)) if diffs else None
        key = pair_key(components[i], components[j])
        inter[key] = value if len(diffs) == total else None
        matched[key] = {"value": value, "contexts": len(diffs), "of": total}
    return inter, matched


def _shapley(v: dict[Subset, float], components: Sequence[str]) -> dict[str, float | None]:
    n = len(components)
    if len(v) < 2**n:
        return dict.fromkeys(components)
    phi: dict[str, float | None] = {}
    for i, c in enumerate(components):
        total = 0.0
        for ctx in itertools.product((0, 1), repeat=n - 1):
            size = sum(ctx)
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            total += weight * (v[_with(ctx, [i], [1], n)] - v[_with(ctx, [i], [0], n)])
        phi[c] = total
    return phi


def _anova(
    df: pd.DataFrame, components: Sequence[str], metric: str, n_subsets: int
) -> tuple[dict | None, str]:
    """OLS with main effects and pairwise interactions on the replicate rows; p-values per term.

    Effect coding (±1) makes the terms orthogonal on a balanced 2^n design, so each single-degree-of-freedom
    term's F test (= t²) is the type-III ANOVA test. Returns (None, why) when the data cannot support it.
    """
    import statsmodels.api as sm
    from scipy import stats

    rows = complete_rows(df)
    y = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(y)
    y = y[keep]
    x = rows[list(components)].to_numpy(dtype=float)[keep] * 2.0 - 1.0
    columns = {"Intercept": np.ones(len(y))}
    for i, c in enumerate(components):
        columns[c] = x[:, i]
    for i, j in itertools.combinations(range(len(components)), 2):
        columns[pair_key(components[i], components[j])] = x[:, i] * x[:, j]
    design = np.column_stack(list(columns.values()))
    p = design.shape[1]
    rank = int(np.linalg.matrix_rank(design)) if len(y) else 0
    if rank < p:
        return None, (
            f"ANOVA omitted: the {n_subsets} subsets present cannot separate all {p - 1} main-effect and "
            "pairwise-interaction terms (design matrix rank deficient)"
        )
    df_resid = len(y) - p
    if df_resid < 1:
        return None, (
            f"ANOVA omitted: {len(y)} rows for {p} coefficients leave no residual degrees of freedom "
            "(add seeds to get significance tests)"
        )
    fit = sm.OLS(y, design).fit()
    ss_total = float(np.sum((y - y.mean()) ** 2))
    if fit.ssr <= _EXACT_FIT_RTOL * max(ss_total, 1e-300):
        return None, "ANOVA omitted: the model fits exactly (zero residual variance), F tests are undefined"
    replicated = len(y) > n_subsets
    error = (
        "replicate rows (seeds)" + (" and higher-order interactions" if df_resid > len(y) - n_subsets else "")
        if replicated
        else "pooled higher-order interactions (no replicates: assumes they are zero)"
    )
    terms = {}
    for k, name in enumerate(columns):
        if name == "Intercept":
            continue
        f_value = float(fit.tvalues[k] ** 2)
        terms[name] = {
            "coef": float(fit.params[k]),
            "F": f_value,
            "p": float(stats.f.sf(f_value, 1, df_resid)),
        }
    result = {
        "terms": terms,
        "df_resid": int(df_resid),
        "n_rows": int(len(y)),
        "error_term": error,
        "coding": "effect coding (±1), one F test per single-df term (type III)",
    }
    return result, f"ANOVA: OLS with main effects and pairwise interactions; error from {error}"


def analyse_effects(df: pd.DataFrame, components: Sequence[str], metric: str) -> dict:
    """Main effects, Shapley values, pair interactions and ANOVA p-values of ``components`` on ``metric``.

    ``df`` holds one row per trial with one 0/1 column per component and the metric column; rows whose
    ``state`` is not COMPLETE and rows without a finite metric value are ignored. Subset means are taken
    over seeds first, then effects over subsets (module docstring). Returns::

        {"main_effects": {comp: x | None}, "shapley": {comp: x | None},
         "interactions": {"a×b": x | None}, "anova": {...} | None,
         "missing_subsets": ["{a, c}", ...], "identifiable": {"main_effects": {...}, "shapley": bool,
         "interactions": {...}}, "matched_pairs": {...}, "matched_quads": {...}, "subsets": [...],
         "notes": [...]}

    ``None`` marks a quantity that is not identifiable from the subsets present.
    """
    components = list(components)
    means = subset_means(df, components, metric)
    v = {tuple(k): float(val) for k, val in means["v"].items()}
    n = len(components)
    every = list(itertools.product((0, 1), repeat=n))
    missing = [s for s in every if s not in v]
    main, matched_pairs = _main_effects(v, components)
    inter, matched_quads = _interactions(v, components)
    shapley = _shapley(v, components)

    notes = [
        "v(S) = mean of the metric over the COMPLETE rows of subset S (its seeds, and in a search its "
        "hyperparameter draws); effects are then "
        "averaged over subsets, each subset weighing the same."
    ]
    if not v:
        notes.append(f"no COMPLETE row with a value for {metric}: nothing to analyse")
    if missing:
        notes.append(
            f"incomplete factorial: {len(missing)} of {2**n} subsets missing; main effects, interactions and "
            "Shapley values that need them are not identifiable (None)"
        )
    anova, anova_note = (None, "ANOVA omitted: no data") if not v else _anova(df, components, metric, len(v))
    notes.append(anova_note)
    total = v.get(tuple([1] * n), np.nan) - v.get(tuple([0] * n), np.nan)
    return {
        "main_effects": main,
        "shapley": shapley,
        "interactions": inter,
        "anova": anova,
        "missing_subsets": [format_subset(s, components) for s in missing],
        "identifiable": {
            "main_effects": {c: main[c] is not None for c in components},
            "shapley": all(x is not None for x in shapley.values()),
            "interactions": {k: x is not None for k, x in inter.items()},
        },
        "matched_pairs": matched_pairs,
        "matched_quads": matched_quads,
        "subsets": [
            {
                "subset": format_subset(k, components),
                "mean": float(row["v"]),
                "std": None if pd.isna(row["std"]) else float(row["std"]),
                "n": int(row["n"]),
            }
            for k, row in means.iterrows()
        ],
        "full_minus_empty": None if not np.isfinite(total) else float(total),
        "notes": notes,
    }
