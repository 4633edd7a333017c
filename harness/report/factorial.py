"""Which design the factorial rows form, and the effects it identifies, with confidence intervals.

Why a module of its own: a report must analyse a full factorial, a regular fraction and an arbitrary set
of subsets each the way it allows, and say once what it cannot identify. :func:`design_effects` is the
one entry point; it returns the effects.json entry of a metric:

- full factorial: :func:`harness.report.effects.analyse_effects` (main effects, exact Shapley values,
  interactions, ANOVA), plus the least-squares fit's 95% CIs (``"fit"``);
- regular 2^(k−p) fraction: the least-squares fit of main effects and pair interactions on the ±1-coded
  rows (seeds as replicates), each with its alias chain and CI; no Shapley value (it needs all 2^k
  subsets), and the report says so;
- anything else: ``analyse_effects``'s incomplete-factorial answer (conditional effects only).

Only the components that vary among the factorial rows are analysed: a component switched on only in a
preset has no on/off contrast in the factorial (presets are reported beside it, never pooled into it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

import numpy as np
import pandas as pd

from harness.design import Design, fit_terms, recognise_design
from harness.report.effects import analyse_effects, complete_rows, format_subset, pair_key

__all__ = ["design_effects", "factorial_design", "varied_components"]


def varied_components(factorial: pd.DataFrame, components: Sequence[str]) -> list[str]:
    """The components switched both on and off among the COMPLETE factorial rows."""
    rows = complete_rows(factorial)
    return [c for c in components if c in rows.columns and rows[c].astype(int).nunique() > 1]


def factorial_design(factorial: pd.DataFrame, components: Sequence[str]) -> Design | None:
    """The full factorial or regular fraction the COMPLETE rows' subsets form, else None."""
    if not components:
        return None
    rows = complete_rows(factorial)
    runs = rows[list(components)].astype(int).to_numpy().tolist()
    return recognise_design(runs, components)


def _design_info(design: Design) -> dict:
    return {
        "name": design.name(),
        "relation": design.relation(),
        "runs": design.n_runs,
        "of": 2**design.k,
        "resolution": design.resolution,
    }


def _fit(rows: pd.DataFrame, design: Design, metric: str) -> tuple[list[dict], dict]:
    y = pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float)
    keep = np.isfinite(y)
    z = rows[list(design.factors)].astype(int).to_numpy()[keep]
    se = None
    if f"{metric}_se" in rows.columns:
        se = pd.to_numeric(rows[f"{metric}_se"], errors="coerce").to_numpy(dtype=float)[keep]
    terms, info = fit_terms(design, z, y[keep], se)
    return [asdict(t) for t in terms], info


def design_effects(factorial: pd.DataFrame, components: Sequence[str], metric: str) -> dict:
    """The effects.json entry of ``metric`` for the factorial rows (module docstring)."""
    rows = complete_rows(factorial)
    rows = rows[np.isfinite(pd.to_numeric(rows[metric], errors="coerce").to_numpy(dtype=float))]
    design = factorial_design(rows, components)
    if design is None or design.is_full:
        out = analyse_effects(rows, components, metric)
        out["design"] = _design_info(design) if design is not None else None
        if design is not None:
            out["fit"], out["fit_info"] = _fit(rows, design, metric)
        return out
    fit, info = _fit(rows, design, metric)
    by_term = {t["term"]: t for t in fit}
    main = {c: by_term[c]["estimate"] for c in components}
    inter = {
        pair_key(a, b): by_term[f"{a}×{b}"]["estimate"]
        for i, a in enumerate(components)
        for b in components[i + 1 :]
    }
    means = rows.assign(
        _key=[format_subset(tuple(r), components) for r in rows[list(components)].astype(int).to_numpy()]
    )
    grouped = means.groupby("_key")[metric]
    return {
        "main_effects": main,
        "shapley": dict.fromkeys(components),
        "interactions": inter,
        "anova": None,
        "missing_subsets": [],
        "identifiable": {
            "main_effects": {c: v is not None for c, v in main.items()},
            "shapley": False,
            "interactions": {k: v is not None for k, v in inter.items()},
        },
        "subsets": [
            {
                "subset": k,
                "mean": float(g.mean()),
                "std": float(g.std(ddof=1)) if len(g) > 1 else None,
                "n": int(len(g)),
            }
            for k, g in grouped
        ],
        "design": _design_info(design),
        "fit": fit,
        "fit_info": info,
        "notes": [
            f"design: {design.name()} ({design.n_runs} of {2**design.k} subsets), {design.relation()}",
            "effects: least squares on the ±1-coded rows (intercept, main effects, the pair interactions "
            "not aliased with a lower-order term); each estimate stands for its whole alias chain",
            f"CI error term: {info['error']}",
            "Shapley values need every one of the 2^k subsets: a fraction does not define them",
        ],
    }
