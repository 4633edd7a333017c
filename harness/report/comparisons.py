"""The report's paired comparisons: every variant against the references, on the same questions.

Why a module of its own: the statistics live in :mod:`harness.report.paired` (pure arrays); this module
decides *which* comparisons a report makes (every variant against the base model, SDFT and the
strongest baseline; each component's on/off pairs of the factorial), on which metrics (each benchmark,
and the primary score stratified by benchmark), and how they read ("+0.028 [−0.110, +0.170]").

``records``: one row per variant, seed, benchmark and question with columns ``variant``, ``seed``,
``benchmark``, ``question``, ``metric`` (``scienceqa.acc``) and ``score`` (see
:func:`harness.report.sources.question_records`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from harness.report.paired import MDE_FACTOR, compare, mde, planned_mde

__all__ = [
    "comparison_table",
    "distinguishable_sentence",
    "format_ci",
    "mde_summary",
    "paired_metrics",
    "run_comparisons",
]


def format_ci(c: dict | None) -> str:
    """``+0.028 [−0.110, +0.170]`` (– when there is no comparison)."""
    if c is None or not math.isfinite(c["estimate"]):
        return "–"
    return f"{c['estimate']:+.3f} [{c['ci_low']:+.3f}, {c['ci_high']:+.3f}]"


def paired_metrics(records: pd.DataFrame, metrics: Sequence[str], primary: str) -> dict[str, list[str]]:
    """Metric -> the benchmarks its paired difference uses: a benchmark metric its own benchmark, the
    primary score (``mean.acc`` or ``overall``) every benchmark of the records, stratified."""
    per_metric = records.drop_duplicates("metric").set_index("metric")["benchmark"].to_dict()
    out = {m: [per_metric[m]] for m in metrics if m in per_metric}
    if primary in ("mean.acc", "overall") and primary in metrics:
        out[primary] = list(dict.fromkeys(records["benchmark"]))
    return out


def run_comparisons(
    records: pd.DataFrame,
    variants: Sequence[str],
    references: Sequence[str],
    metrics: dict[str, list[str]],
) -> dict[str, dict[str, dict[str, dict | None]]]:
    """``{reference: {variant: {metric: compare(...)}}}`` for every variant other than the reference."""
    out: dict = {}
    for ref in references:
        out[ref] = {}
        for v in variants:
            if v == ref:
                continue
            out[ref][v] = {m: compare(records, [v], [ref], benches) for m, benches in metrics.items()}
    return out


def comparison_table(
    results: dict[str, dict[str, dict | None]], metrics: Sequence[str], primary: str
) -> pd.DataFrame:
    """Variants × metrics of "+Δ [low, high]" against one reference, with the primary metric's test."""
    rows = []
    for v, by_metric in results.items():
        row: dict = {"variant": v}
        for m in metrics:
            row[m] = format_ci(by_metric.get(m))
        c = by_metric.get(primary)
        if c is not None and c["p"] is not None:
            row[f"p ({primary})"] = f"{c['p']:.2g} ({c['test']})"
        else:
            row[f"p ({primary})"] = "–"
        rows.append(row)
    return pd.DataFrame(rows)


def distinguishable_sentence(results: dict[str, dict[str, dict | None]], reference: str, primary: str) -> str:
    """Which variants differ from ``reference`` on ``primary`` beyond noise (95% CI excludes 0)."""
    clear, noise = [], []
    for v, by_metric in results.items():
        c = by_metric.get(primary)
        if c is None:
            continue
        if c["ci_low"] > 0 or c["ci_high"] < 0:
            clear.append(f"{v} ({format_ci(c)})")
        else:
            noise.append(v)
    if not clear and not noise:
        return ""
    parts = []
    if clear:
        parts.append(
            f"Against {reference} on {primary}, distinguishable from noise (paired 95% CI excludes 0): "
            + ", ".join(clear)
            + "."
        )
    if noise:
        parts.append(
            f"{'Not distinguishable' if clear else f'Against {reference} on {primary}, no variant is distinguishable'}"
            f" from noise at this study's size: {', '.join(noise)} (their CIs include 0)."
        )
    return " ".join(parts)


def mde_summary(
    comparisons: dict[str, dict[str, dict[str, dict | None]]],
    metrics: dict[str, list[str]],
    seeds: int,
) -> list[dict]:
    """Per metric: questions, seeds, σ_d pooled over the report's comparisons (root mean square) and the
    MDE at 80% power and 5% level; where no question differs, the planning assumption instead."""
    out = []
    for m, benches in metrics.items():
        sds: dict[str, list[float]] = {b: [] for b in benches}
        counts: dict[str, int] = {}
        for by_variant in comparisons.values():
            for by_metric in by_variant.values():
                c = by_metric.get(m)
                if c is None:
                    continue
                for b, sd in c["sd"].items():
                    if math.isfinite(sd):
                        sds[b].append(sd)
                counts.update(c["n_questions"])
        if not counts:
            continue
        pooled = {b: math.sqrt(np.mean(np.square(v))) if v else float("nan") for b, v in sds.items()}
        n_total = sum(counts.values())
        if len(benches) == 1:
            b = benches[0]
            value, sd = mde(pooled[b], counts.get(b, 0)), pooled[b]
        else:  # stratified mean over benchmarks: variance Σ σ_b² / n_b, over B²
            var = sum(pooled[b] ** 2 / counts[b] for b in benches if b in counts) / len(benches) ** 2
            sd = math.sqrt(var * n_total) if math.isfinite(var) else float("nan")
            value = MDE_FACTOR * math.sqrt(var) if math.isfinite(var) else float("nan")
        source = "observed"
        if not (math.isfinite(value) and value > 0):
            if len(benches) == 1:
                value = planned_mde(counts.get(benches[0], 0), seeds)
            else:
                value = math.sqrt(
                    sum(planned_mde(counts[b], seeds) ** 2 for b in benches if b in counts)
                ) / len(benches)
            source = "assumed (no question differs between the variants compared)"
        out.append(
            {"metric": m, "questions": n_total, "seeds": seeds, "sd_d": sd, "mde": value, "source": source}
        )
    return out
