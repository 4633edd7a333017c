"""Paper-style tables: results per variant and benchmark, deltas, confidence intervals, best subsets.

Variants are ordered as the paper orders them: the base model, then the baselines, then the UniSD variants
(by number of components, then name). Each cell is the mean ± sample standard deviation over the variant's
COMPLETE rows (seeds); the 95% confidence interval uses Student's t with n − 1 degrees of freedom.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from harness.report.effects import complete_rows

__all__ = [
    "OVERALL",
    "best_subsets",
    "ci_table",
    "delta_table",
    "ensure_variant_columns",
    "factorial_rows",
    "higher_is_better",
    "is_benchmark_metric",
    "order_variants",
    "pareto_front",
    "primary_metric",
    "results_table",
    "variant_stats",
    "with_overall",
]

OVERALL = "overall"
_PRESET_NAMES = frozenset({"unisd_star", "unisd_star_paper"})
_FAMILY_ORDER = {"base": 0, "baseline": 1, "unisd": 2}
_LOWER_IS_BETTER = ("ppl", "jsd", "loss", "seconds", "tokens")


def higher_is_better(metric: str) -> bool:
    """Accuracy-like metrics go up; perplexities, divergences, losses and costs go down."""
    return not any(word in metric.lower() for word in _LOWER_IS_BETTER)


def is_benchmark_metric(metric: str) -> bool:
    """``"<bench>.<score>"`` such as ``scienceqa.acc`` or ``mbpp.pass_at_1`` (not ``mean.acc``, not ppl)."""
    bench, _, score = metric.partition(".")
    return bool(score) and bench != "mean" and higher_is_better(metric)


def ensure_variant_columns(df: pd.DataFrame, components: Sequence[str]) -> pd.DataFrame:
    """A table without ``variant``/``family`` (a plain factorial CSV) gets names derived from its components:
    ``"a+c"`` for the subset {a, c}, ``"none"`` for the empty one; every row is family ``unisd``."""
    out = df.copy()
    if "variant" not in out.columns:
        names = []
        for row in out[list(components)].to_numpy():
            on = [c for c, x in zip(components, row, strict=True) if int(x) == 1]
            names.append("+".join(on) if on else "none")
        out["variant"] = names
    if "family" not in out.columns:
        out["family"] = "unisd"
    return out


def factorial_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the component factorial: the UniSD subsets plus SDFT, which is the empty subset.

    Base, SFT and GKD also have every component column at 0 but are different methods: mixing them into
    the empty subset would corrupt every effect, so they are left out of the effects analysis. Presets
    (``unisd_star`` ...) are recipes with their own hyperparameters: they are reported beside the
    factorial, never pooled into the cell of their component set.
    """
    if "family" not in df.columns:
        return df
    from harness.spec import PRESET_COMPONENTS

    keep = df["family"].astype(str) == "unisd"
    if "variant" in df.columns:
        keep &= ~df["variant"].astype(str).isin(list(PRESET_COMPONENTS))
        keep |= df["variant"].astype(str) == "sdft"
    # A preset shares a subset's components but not its hyperparameters (or batch): never a replicate of
    # that subset's cell (unisd-method.md section 5). Marked by variant_kind; older results by name.
    if "variant_kind" in df.columns:
        keep &= df["variant_kind"].astype(str) != "preset"
    if "variant" in df.columns:
        keep &= ~df["variant"].astype(str).isin(_PRESET_NAMES)
    return df[keep]


def with_overall(df: pd.DataFrame, metrics: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Add the paper's "overall" (unweighted mean of the benchmark scores) when the table lacks ``mean.acc``.

    Returns the table and the metric list to analyse: ``metrics`` plus ``overall`` when it was computed
    from at least two benchmark columns.
    """
    metrics = list(metrics)
    benches = [m for m in metrics if is_benchmark_metric(m)]
    if "mean.acc" in metrics or len(benches) < 2 or OVERALL in df.columns:
        return df, metrics
    out = df.copy()
    out[OVERALL] = out[benches].apply(pd.to_numeric, errors="coerce").mean(axis=1, skipna=False)
    return out, [*metrics, OVERALL]


def primary_metric(metrics: Sequence[str]) -> str:
    """The metric the conclusions talk about: the overall score if there is one, else the first metric."""
    for name in ("mean.acc", OVERALL):
        if name in metrics:
            return name
    return metrics[0]


def order_variants(df: pd.DataFrame, components: Sequence[str] = ()) -> list[str]:
    """Base, baselines, then UniSD variants by number of components; ties keep the order of appearance."""
    flat = df.reset_index(drop=True)
    first = flat.groupby("variant", sort=False).agg(family=("family", "first"))
    first["position"] = flat.groupby("variant", sort=False).apply(
        lambda s: s.index.min(), include_groups=False
    )
    comps = [c for c in components if c in flat.columns]
    n_on = flat.groupby("variant", sort=False)[comps].max().sum(axis=1) if comps else None

    def key(name: str) -> tuple:
        family = str(first.loc[name, "family"])
        size = int(n_on[name]) if n_on is not None and family == "unisd" else 0
        return (_FAMILY_ORDER.get(family, 3), size, int(first.loc[name, "position"]))

    return sorted(first.index, key=key)


def variant_stats(df: pd.DataFrame, metrics: Sequence[str], components: Sequence[str] = ()) -> pd.DataFrame:
    """Long table: variant, family, metric, n, mean, std, se, ci_low, ci_high.

    Without per-question standard errors: the 95% CI is Student's t over the seeds (none for one seed).
    With a ``<metric>_se`` column (the questions' standard error of each trial's score), the seed spread
    and the question spread are combined, ``se = √(s²/n + mean(se_q²))``, and the CI is ``mean ± 1.96·se``
    (conservative: every seed answers the same questions, so their question errors are not independent).
    """
    rows = complete_rows(df)
    records = []
    for variant in order_variants(rows, components) if len(rows) else []:
        sub = rows[rows["variant"] == variant]
        family = str(sub["family"].iloc[0])
        for metric in metrics:
            y = pd.to_numeric(sub[metric], errors="coerce").to_numpy(dtype=float)
            y = y[np.isfinite(y)]
            n = len(y)
            mean = float(y.mean()) if n else np.nan
            std = float(y.std(ddof=1)) if n > 1 else np.nan
            half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else np.nan
            se = float(std / np.sqrt(n)) if n > 1 else np.nan
            if f"{metric}_se" in sub.columns:  # per-question standard errors: add the question spread
                q = pd.to_numeric(sub[f"{metric}_se"], errors="coerce").to_numpy(dtype=float)
                q = q[np.isfinite(q)]
                if len(q) and n:
                    se = float(np.sqrt((std**2 / n if n > 1 else 0.0) + np.mean(q**2)))
                    half = float(stats.norm.ppf(0.975) * se)
            records.append(
                {
                    "variant": variant,
                    "family": family,
                    "metric": metric,
                    "n": n,
                    "mean": mean,
                    "std": std,
                    "se": se,
                    "ci_low": mean - half,
                    "ci_high": mean + half,
                }
            )
    return pd.DataFrame(
        records, columns=["variant", "family", "metric", "n", "mean", "std", "se", "ci_low", "ci_high"]
    )


def _fmt(x: float, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _signed(x: float, digits: int = 3) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{x:+.{digits}f}"


def _references(st: pd.DataFrame, primary: str) -> tuple[str | None, str | None]:
    """The base variant and the strongest baseline (best on the primary metric)."""
    on_primary = st[st["metric"] == primary]
    base = on_primary[on_primary["family"] == "base"]
    base_name = str(base["variant"].iloc[0]) if len(base) else None
    baselines = on_primary[(on_primary["family"] == "baseline") & np.isfinite(on_primary["mean"])]
    best = None
    if len(baselines):
        pick = baselines["mean"].idxmax() if higher_is_better(primary) else baselines["mean"].idxmin()
        best = str(baselines.loc[pick, "variant"])
    return base_name, best


def results_table(st: pd.DataFrame, metrics: Sequence[str], primary: str) -> tuple[pd.DataFrame, dict]:
    """Variants × metrics as "mean ± std", with the number of COMPLETE rows ``n`` and deltas of the primary metric against the base
    and the strongest baseline. Returns the display table and {"base": name, "best_baseline": name}."""
    base, best = _references(st, primary)
    mean = st.pivot(index="variant", columns="metric", values="mean")
    std = st.pivot(index="variant", columns="metric", values="std")
    order = list(dict.fromkeys(st["variant"]))
    families = st.drop_duplicates("variant").set_index("variant")["family"]
    seeds = st.groupby("variant")["n"].max()
    table = pd.DataFrame(index=order)
    table.index.name = "variant"
    table["family"] = [families[v] for v in order]
    table["n"] = [int(seeds[v]) for v in order]
    for m in metrics:
        table[m] = [
            _fmt(mean.loc[v, m]) + ("" if not np.isfinite(std.loc[v, m]) else f" ± {_fmt(std.loc[v, m])}")
            for v in order
        ]
    if base is not None:
        table[f"Δ {primary} vs {base}"] = [
            _signed(mean.loc[v, primary] - mean.loc[base, primary]) for v in order
        ]
    if best is not None:
        table[f"Δ {primary} vs {best}"] = [
            _signed(mean.loc[v, primary] - mean.loc[best, primary]) for v in order
        ]
    return table.reset_index(), {"base": base, "best_baseline": best}


def delta_table(st: pd.DataFrame, metrics: Sequence[str], reference: str) -> pd.DataFrame:
    """Per metric: each variant's mean minus the reference variant's mean."""
    mean = st.pivot(index="variant", columns="metric", values="mean")
    order = list(dict.fromkeys(st["variant"]))
    table = pd.DataFrame(
        {m: [_signed(mean.loc[v, m] - mean.loc[reference, m]) for v in order] for m in metrics}, index=order
    )
    table.index.name = "variant"
    return table.reset_index()


def ci_table(st: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Per metric: "[low, high]" 95% confidence interval of the mean over seeds (– with one seed)."""
    order = list(dict.fromkeys(st["variant"]))
    lo = st.pivot(index="variant", columns="metric", values="ci_low")
    hi = st.pivot(index="variant", columns="metric", values="ci_high")
    table = pd.DataFrame(
        {
            m: [
                "–" if not np.isfinite(lo.loc[v, m]) else f"[{_fmt(lo.loc[v, m])}, {_fmt(hi.loc[v, m])}]"
                for v in order
            ]
            for m in metrics
        },
        index=order,
    )
    table.index.name = "variant"
    return table.reset_index()


def best_subsets(effects: dict[str, dict], metrics: Sequence[str]) -> pd.DataFrame:
    """Per metric: the component subset with the best seed-mean among the factorial rows."""
    records = []
    for m in metrics:
        subsets = [s for s in effects[m]["subsets"] if np.isfinite(s["mean"])]
        if not subsets:
            continue
        pick = (max if higher_is_better(m) else min)(subsets, key=lambda s: s["mean"])
        records.append(
            {
                "metric": m,
                "direction": "higher" if higher_is_better(m) else "lower",
                "best subset": pick["subset"],
                "mean": _fmt(pick["mean"]),
                "n": pick["n"],
            }
        )
    return pd.DataFrame(records, columns=["metric", "direction", "best subset", "mean", "n"])


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point beats: lower ``x`` (cost, drift) and higher ``y``."""
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y >= y[i]) & ((x < x[i]) | (y > y[i]))
        keep[i] = not dominated.any()
    return keep
