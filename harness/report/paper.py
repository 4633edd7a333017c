"""The paper's tables: variants x benchmark cells per model and averaged over models, self-distillation
against static imitation, and component effects per model, per task and pooled.

Why a module of its own: the paper's unit is a *cell*, a model trained on one task and scored on one
benchmark (``scienceqa``; a transfer cell ``gpqa ← scienceqa``), and its "overall" is the unweighted mean
of the cells. The other report sections read one row per trial and pool whatever the rows hold; here every
number is first taken within its cell (mean over seeds), then combined over cells, so a model or a task
with more trials never weighs more.

Rows used: COMPLETE trials. The base model (trained on nothing) is scored on every cell. Component
effects use the factorial rows only (``variant_kind == "factorial"``: the subsets, SDFT being the empty
one): a preset shares a subset's components but not its hyperparameters, so it is reported beside the
factorial, never inside it. Per-model, per-task and pooled effects are the means of the per-cell effects
(main effects, Shapley values and interactions are linear in the subset means, so on complete cells this
equals the effect of the averaged subset means); a quantity not identifiable in one of its cells is n/a.

Example::

    blocks, info = paper_blocks(results_frame, ["agreement", "ema"])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from harness.axes import cell_label
from harness.report.effects import analyse_effects, complete_rows
from harness.report.render import Block, Heading, Paragraph, Table
from harness.report.tables import is_benchmark_metric

__all__ = ["PRESET_NAMES", "cell_frame", "paper_blocks", "paper_tables", "variant_kinds"]

OVERALL = "overall"
# Variant names of the presets (results written before the variant_kind column existed).
PRESET_NAMES = frozenset({"unisd_star", "unisd_star_paper"})
_STAR_ORDER = ("unisd_star_paper", "unisd_star")
_KIND_RANK = {"base": 0, "baseline": 1, "factorial": 2, "preset": 3}


def variant_kinds(df: pd.DataFrame) -> pd.Series:
    """Each row's kind: base, baseline, factorial (a component subset; SDFT the empty one) or preset.

    The ``variant_kind`` column when the results carry it; else derived from family and variant name.
    """
    if "variant_kind" in df.columns:
        given = df["variant_kind"].astype("string")
        if given.notna().all():
            return given.astype(str)
    family = df.get("family", pd.Series("unisd", index=df.index)).astype(str)
    variant = df.get("variant", pd.Series("", index=df.index)).astype(str)
    kinds = family.where(family.isin(["base", "baseline"]), "factorial")
    kinds = kinds.mask(variant == "sdft", "factorial")
    kinds = kinds.mask(variant.isin(PRESET_NAMES), "preset")
    if "variant_kind" in df.columns:
        kinds = df["variant_kind"].astype("string").fillna(kinds).astype(str)
    return kinds


def _display_rank(kind: str, variant: str) -> int:
    return 1 if variant == "sdft" else _KIND_RANK.get(kind, 4)


def _score_columns(df: pd.DataFrame, metrics: Sequence[str] | None) -> list[str]:
    """One score per benchmark: the given benchmark metrics, else every ``<bench>.acc`` and
    ``<bench>.pass_at_1`` column (never counts such as ``<bench>.n``)."""
    names = [str(c) for c in (metrics if metrics is not None else df.columns)]
    return [
        m for m in names if m in df.columns and is_benchmark_metric(m) and m.endswith((".acc", ".pass_at_1"))
    ]


def cell_frame(
    df: pd.DataFrame, components: Sequence[str] = (), metrics: Sequence[str] | None = None
) -> pd.DataFrame:
    """Long table, one row per (COMPLETE trial, cell): model, variant, kind, seed, train_task, bench, cell,
    value, and the component columns. Per-task results (a ``train_task`` column) give one cell per
    benchmark a task's model was scored on; pooled results give one cell per benchmark."""
    rows = complete_rows(df).reset_index(drop=True)
    metrics = _score_columns(rows, metrics)
    if not len(rows) or not metrics:
        return pd.DataFrame(
            columns=["model", "variant", "kind", "seed", "train_task", "bench", "cell", "value"]
        )
    kinds = variant_kinds(rows)
    models = (
        rows["model"].astype("string").fillna("model")
        if "model" in rows
        else pd.Series("model", index=rows.index)
    )
    tasks = (
        rows["train_task"].astype("string").replace("", pd.NA)
        if "train_task" in rows
        else pd.Series(pd.NA, index=rows.index, dtype="string")
    )
    per_task = bool(tasks[kinds != "base"].notna().any())
    trained_tasks = list(dict.fromkeys(tasks[(kinds != "base") & tasks.notna()].tolist()))
    numeric = {m: pd.to_numeric(rows[m], errors="coerce") for m in metrics}
    # the untrained model is the same for every cell: it is scored wherever a task's model is
    base_owners = {
        m: [t for t in trained_tasks if ((tasks == t) & (kinds != "base") & numeric[m].notna()).any()]
        for m in metrics
    }
    records = []
    for i, row in rows.iterrows():
        for metric in metrics:
            value = numeric[metric][i]
            if not np.isfinite(value):
                continue
            bench = metric.split(".", 1)[0]
            if per_task and kinds[i] == "base":
                owners = base_owners[metric]
            else:
                owners = [tasks[i] if per_task else None]
            for task in owners:
                records.append(
                    {
                        "model": models[i],
                        "variant": row["variant"],
                        "kind": kinds[i],
                        "seed": row.get("seed", 0),
                        "train_task": task,
                        "bench": bench,
                        "cell": cell_label(task, bench),
                        "value": float(value),
                        **{c: int(row[c]) for c in components if c in rows.columns},
                    }
                )
    long = pd.DataFrame(records)
    if not len(long):
        return long
    # cells in the paper's order: the in-domain cells (training-task order), then the transfer cells
    firsts = long.drop_duplicates("cell").reset_index(drop=True)
    rank = {t: i for i, t in enumerate(trained_tasks)}
    order = sorted(
        firsts["cell"],
        key=lambda c: (
            "←" in c,
            rank.get(firsts.loc[firsts["cell"] == c, "train_task"].iloc[0], -1),
            list(firsts["cell"]).index(c),
        ),
    )
    long["cell"] = pd.Categorical(long["cell"], categories=order, ordered=True)
    return long


def _fmt(x: Any, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "–"
    return f"{x:+.3f}" if signed else f"{x:.3f}"


def _cell_means(long: pd.DataFrame) -> pd.DataFrame:
    """model x variant x cell: mean over seeds; with the variant's kind."""
    means = (
        long.groupby(["model", "variant", "cell"], observed=True, sort=False)["value"].mean().reset_index()
    )
    kinds = long.drop_duplicates("variant").set_index("variant")["kind"]
    means["kind"] = means["variant"].map(kinds)
    return means


def _results(means: pd.DataFrame, cells: list[str]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """variants x cells (+ overall, deltas): the paper's results table for one model (or the average)."""
    wide = means.pivot_table(index="variant", columns="cell", values="value", observed=True, sort=False)
    wide = wide.reindex(columns=cells)
    wide[OVERALL] = wide[cells].mean(axis=1, skipna=False)
    kinds = means.drop_duplicates("variant").set_index("variant")["kind"]
    seen = list(dict.fromkeys(means["variant"]))  # the plan's order: subsets by size
    order = sorted(wide.index, key=lambda v: (_display_rank(str(kinds[v]), v), _size(v), seen.index(v)))
    wide = wide.loc[order]
    base = next((v for v in order if kinds[v] == "base"), None)
    baselines = [v for v in order if kinds[v] == "baseline" or v == "sdft"]
    scored = [v for v in baselines if np.isfinite(wide.loc[v, OVERALL])]
    best = max(scored, key=lambda v: wide.loc[v, OVERALL]) if scored else None
    table = pd.DataFrame({"variant": order, "kind": [str(kinds[v]) for v in order]})
    for column in [*cells, OVERALL]:
        table[column] = [_fmt(wide.loc[v, column]) for v in order]
    if base is not None:
        table[f"Δ overall vs {base}"] = [
            _fmt(wide.loc[v, OVERALL] - wide.loc[base, OVERALL], True) for v in order
        ]
    if best is not None:
        table[f"Δ overall vs {best}"] = [
            _fmt(wide.loc[v, OVERALL] - wide.loc[best, OVERALL], True) for v in order
        ]
    data = {
        "cells": {v: {c: _num(wide.loc[v, c]) for c in [*cells, OVERALL]} for v in order},
        "base": base,
        "strongest_baseline": best,
    }
    return table, data


def _size(variant: str) -> int:
    """Number of components of a subset's name (``unisd[a+b]`` -> 2); 0 for other variants."""
    return variant.count("+") + 1 if variant.startswith("unisd[") else 0


def _num(x: Any) -> float | None:
    return float(x) if x is not None and np.isfinite(x) else None


def _star(variants: Sequence[str], kinds: pd.Series, components: Sequence[str]) -> str | None:
    """UniSD* in this study: the paper preset, else our preset, else the largest factorial subset."""
    for name in _STAR_ORDER:
        if name in variants:
            return name
    subsets = [v for v in variants if kinds.get(v) == "factorial" and v.startswith("unisd[")]
    return max(subsets, key=lambda v: v.count("+"), default=None)


def _beats_sft(
    means: pd.DataFrame, cells: list[str], components: Sequence[str]
) -> tuple[pd.DataFrame, str | None]:
    """Per model x cell (and overall): SFT's score, SDFT − SFT and UniSD* − SFT."""
    kinds = means.drop_duplicates("variant").set_index("variant")["kind"]
    star = _star(list(kinds.index), kinds, components)
    records = []
    for model, sub in means.groupby("model", sort=False):
        wide = sub.pivot_table(index="variant", columns="cell", values="value", observed=True).reindex(
            columns=cells
        )
        wide[OVERALL] = wide[cells].mean(axis=1, skipna=False)
        if "sft" not in wide.index:
            continue
        for cell in [*cells, OVERALL]:
            sft = wide.loc["sft", cell]
            record = {"model": model, "cell": cell, "SFT": _fmt(sft)}
            for label, name in (("SDFT − SFT", "sdft"), (f"{star} − SFT" if star else "UniSD* − SFT", star)):
                value = wide.loc[name, cell] - sft if name in wide.index else np.nan
                record[label] = _fmt(value, True)
            records.append(record)
    return pd.DataFrame(records), star


def _effect_tables(long: pd.DataFrame, components: Sequence[str]) -> tuple[dict[str, pd.DataFrame], dict]:
    """Main effects (and Shapley values) per (model, cell), then averaged per model, per cell, pooled."""
    factorial = long[long["kind"] == "factorial"]
    components = [c for c in components if c in factorial.columns]
    if not components or not len(factorial):
        return {}, {}
    per_cell: dict[tuple[str, str], dict] = {}
    for (model, cell), sub in factorial.groupby(["model", "cell"], observed=True, sort=False):
        per_cell[(str(model), str(cell))] = analyse_effects(sub, components, "value")

    def row(effects: list[dict]) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        for c in components:
            values = [e["main_effects"][c] for e in effects]
            out[c] = None if any(v is None for v in values) else float(np.mean(values))
        pairs = list(effects[0]["interactions"]) if effects else []
        for key in pairs:
            values = [e["interactions"][key] for e in effects]
            out[key] = None if any(v is None for v in values) else float(np.mean(values))
        return out

    def table(groups: dict[str, list[dict]], label: str) -> pd.DataFrame:
        records = []
        for name, effects in groups.items():
            values = row(effects)
            records.append(
                {label: name, "cells": len(effects), **{k: _fmt(v, True) for k, v in values.items()}}
            )
        return pd.DataFrame(records)

    by_model: dict[str, list[dict]] = {}
    by_cell: dict[str, list[dict]] = {}
    for (model, cell), e in per_cell.items():
        by_model.setdefault(model, []).append(e)
        by_cell.setdefault(cell, []).append(e)
    cell_rows = []
    for (model, cell), e in per_cell.items():
        values = row([e])
        cell_rows.append({"model": model, "cell": cell, **{k: _fmt(v, True) for k, v in values.items()}})
    tables = {
        "per model and cell": pd.DataFrame(cell_rows),
        "per model": table(by_model, "model"),
        "per task cell": table(by_cell, "cell"),
        "pooled": table({"all cells": list(per_cell.values())}, "pooled over"),
    }
    data = {
        "per_cell": [{"model": m, "cell": c, **row([e])} for (m, c), e in per_cell.items()],
        "per_model": {m: row(es) for m, es in by_model.items()},
        "per_task_cell": {c: row(es) for c, es in by_cell.items()},
        "pooled": row(list(per_cell.values())),
    }
    return tables, data


def paper_tables(
    df: pd.DataFrame, components: Sequence[str] = (), metrics: Sequence[str] | None = None
) -> dict[str, Any]:
    """Every table of this module as DataFrames plus their numbers (JSON-ready): ``results`` (one per
    model, and ``averaged over models`` when there are several), ``beats_sft``, ``effects``."""
    long = cell_frame(df, components, metrics)
    if not len(long):
        return {"results": {}, "beats_sft": None, "effects": {}, "data": {}}
    cells = [str(c) for c in long["cell"].cat.categories if (long["cell"] == c).any()]
    means = _cell_means(long)
    results: dict[str, pd.DataFrame] = {}
    data: dict[str, Any] = {"cells": cells, "results": {}}
    for model, sub in means.groupby("model", sort=False):
        results[str(model)], data["results"][str(model)] = _results(sub, cells)
    if means["model"].nunique() > 1:
        # averaged over models: each model's seed-mean first, so every model weighs the same
        averaged = means.groupby(["variant", "cell"], observed=True, sort=False)["value"].mean().reset_index()
        averaged["kind"] = averaged["variant"].map(
            means.drop_duplicates("variant").set_index("variant")["kind"]
        )
        averaged["model"] = "averaged over models"
        counts = means.groupby(["variant", "cell"], observed=True)["model"].nunique()
        complete = counts[counts == means["model"].nunique()].reset_index()[["variant", "cell"]]
        averaged = averaged.merge(complete, on=["variant", "cell"])  # a cell some model lacks is left out
        key = "averaged over models"
        results[key], data["results"][key] = _results(averaged, cells)
    beats, star = _beats_sft(means, cells, components)
    effects, data["effects"] = _effect_tables(long, components)
    data["unisd_star"] = star
    return {"results": results, "beats_sft": beats, "star": star, "effects": effects, "data": data}


def paper_blocks(
    df: pd.DataFrame, components: Sequence[str] = (), metrics: Sequence[str] | None = None
) -> tuple[list[Block], dict[str, Any]]:
    """The report section: the paper's results tables, self-distillation vs SFT, effects per cell.

    Only for results with axes (several models, or per-task training): a one-model pooled study's
    results table already is its paper table."""
    models = df["model"].dropna().nunique() if "model" in df.columns else 0
    per_task = "train_task" in df.columns and df["train_task"].replace("", np.nan).notna().any()
    if models < 2 and not per_task:
        return [], {}
    tables = paper_tables(df, components, metrics)
    if not tables["results"]:
        return [], {}
    blocks: list[Block] = [
        Heading("Paper tables: results per benchmark cell", 2),
        Paragraph(
            "One column per cell: a model trained on one task and scored on one benchmark (`gpqa ← scienceqa`: "
            "the ScienceQA model scored on GPQA); the base model, trained on nothing, is scored on every cell. "
            "Each value is the mean over seeds; overall = the unweighted mean of the cells (– when a cell is "
            "missing); Δ against the base model and the strongest baseline (SFT, SDFT, GKD) on overall. "
            "Presets are their own rows, beside the factorial."
        ),
    ]
    for name, table in tables["results"].items():
        caption = (
            "Averaged over models (each model's seed-mean first)"
            if name.startswith("averaged")
            else f"Model {name}"
        )
        blocks.append(Table(table, caption))
    beats = tables["beats_sft"]
    if beats is not None and len(beats):
        blocks += [
            Heading("When does self-distillation beat static imitation?", 2),
            Table(
                beats,
                f"SDFT and UniSD* ({tables['star'] or 'not in this study'}) minus SFT, per model and cell "
                "(positive: self-distillation ahead)",
            ),
        ]
    if tables["effects"]:
        blocks += [
            Heading("Component effects per model, per task and pooled", 2),
            Paragraph(
                "Main effects (and pair interactions a×b) of each component on the cell's score, from the "
                "factorial rows only (presets excluded), computed within each (model, cell), then averaged over "
                "cells (per model), over models (per task cell) or over all of them (pooled). n/a (–): not "
                "identifiable in at least one of the cells averaged."
            ),
        ]
        for name, table in tables["effects"].items():
            blocks.append(Table(table, f"Component effects, {name}"))
    return blocks, tables["data"]
