"""Assemble the component-interaction report of a study: tables, effects, figures, conclusions, files.

``build_report`` is the single entry point: the study runner calls it at the end of ``harness run``, the
``harness report`` command calls it on a finished study or on any factorial CSV.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from harness.errors import HarnessError
from harness.jsonable import jsonable
from harness.report import plots
from harness.report.effects import analyse_effects, complete_rows
from harness.report.paper import paper_blocks
from harness.report.render import (
    Block,
    Bullets,
    Code,
    FigureBlock,
    Heading,
    Paragraph,
    Table,
    to_html,
    to_markdown,
)
from harness.report.tables import (
    best_subsets,
    ci_table,
    delta_table,
    ensure_variant_columns,
    factorial_rows,
    higher_is_better,
    primary_metric,
    results_table,
    variant_stats,
    with_overall,
)

__all__ = ["ReportFiles", "build_report"]

_PARETO_AXES = ("ppl_ret", "train_seconds", "generated_tokens")
_SIGNIFICANCE = 0.05


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything a report wrote (all inside ``directory``)."""

    directory: Path
    markdown: Path
    html: Path
    results_csv: Path
    effects_json: Path
    figures: tuple[Path, ...] = field(default_factory=tuple)

    def all(self) -> list[Path]:
        return [self.markdown, self.html, self.results_csv, self.effects_json, *self.figures]


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


def _num(x: float | None, signed: bool = True) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def _p(x: float | None) -> str:
    return "–" if x is None else (f"{x:.2g}" if x >= 1e-4 else "<1e-4")


def _validate(df: pd.DataFrame, components: Sequence[str], metrics: Sequence[str], study_kind: str) -> None:
    if study_kind not in ("ablation", "search"):
        raise HarnessError(f"study_kind must be 'ablation' or 'search' (got {study_kind!r})")
    if not metrics:
        raise HarnessError("no metrics given: name at least one metric column")
    missing = [c for c in [*components, *metrics] if c not in df.columns]
    if missing:
        raise HarnessError(
            f"column(s) {', '.join(missing)} not in the results table (columns: {', '.join(map(str, df.columns))})"
        )
    if complete_rows(df).empty:
        raise HarnessError("no COMPLETE trial in the results: nothing to report yet")


def _contributions(effects: dict, components: Sequence[str]) -> tuple[dict[str, float], str]:
    """The best identifiable per-component numbers: Shapley, else main effects, else conditional effects."""
    if effects["identifiable"]["shapley"]:
        return {c: effects["shapley"][c] for c in components}, "Shapley value"
    if all(effects["identifiable"]["main_effects"].values()):
        return {c: effects["main_effects"][c] for c in components}, "main effect"
    cond = {c: effects["matched_pairs"][c]["value"] for c in components}
    return {c: v for c, v in cond.items() if v is not None}, "conditional effect over the subsets present"


def _best_variant_sentence(primary: str, stats: pd.DataFrame, refs: dict) -> str:
    sign = 1.0 if higher_is_better(primary) else -1.0
    on_primary = stats[
        (stats["metric"] == primary) & (stats["family"] == "unisd") & np.isfinite(stats["mean"])
    ]
    if not len(on_primary):
        return ""
    pick = on_primary.loc[(on_primary["mean"] * sign).idxmax()]
    means = stats[stats["metric"] == primary].set_index("variant")["mean"]
    deltas = [
        f"{_num(pick['mean'] - means[refs[k]])} vs {refs[k]}" for k in ("base", "best_baseline") if refs[k]
    ]
    return (
        f"Best UniSD variant on {primary}: {pick['variant']} ({_num(pick['mean'], signed=False)}"
        + (f"; {', '.join(deltas)}" if deltas else "")
        + ")."
    )


def _conclusions(
    effects: dict[str, dict], components: Sequence[str], primary: str, stats: pd.DataFrame, refs: dict
) -> str:
    """Plain-language summary: the drivers on the primary metric, the strongest interaction, the best variant.

    Significance words appear only next to an ANOVA p-value; without one the numbers speak alone.
    """
    best = _best_variant_sentence(primary, stats, refs)
    if not components:
        return " ".join(filter(None, ["No component varies in this study: no effect to estimate.", best]))
    e = effects[primary]
    sign = 1.0 if higher_is_better(primary) else -1.0
    direction = "higher" if sign > 0 else "lower"
    anova = e["anova"]
    sentences = []
    values, label = _contributions(e, components)
    if not values:
        return " ".join(
            filter(
                None, [f"No component effect on {primary} is identifiable from the subsets present.", best]
            )
        )

    def sig(term: str) -> str:
        if anova is None or term not in anova["terms"]:
            return ""
        p = anova["terms"][term]["p"]
        verdict = "significant" if p < _SIGNIFICANCE else "not significant"
        shown = "p < 1e-4" if p < 1e-4 else f"p = {_p(p)}"
        return f"; ANOVA {shown}, {verdict} at the 5% level"

    ranked = sorted(values, key=lambda c: sign * values[c], reverse=True)
    gains = [c for c in ranked if sign * values[c] > 0]
    losses = [c for c in ranked if sign * values[c] < 0]
    if gains:
        lead = gains[0]
        rest = ", ".join(f"{c} ({_num(values[c])})" for c in gains[1:])
        sentences.append(
            f"On {primary} ({direction} is better), the gains are driven most by {lead} "
            f"({label} {_num(values[lead])}{sig(lead)})" + (f", followed by {rest}" if rest else "") + "."
        )
    else:
        sentences.append(f"On {primary} ({direction} is better), no component improves the score ({label}s).")
    if losses:
        sentences.append(
            "Working against it: " + ", ".join(f"{c} ({_num(values[c])}{sig(c)})" for c in losses) + "."
        )
    pairs = {k: v for k, v in e["interactions"].items() if v is not None}
    if pairs:
        key = max(pairs, key=lambda k: abs(pairs[k]))
        a, b = key.split("×")
        kind = "synergy: together they do better than their separate effects add up to"
        if sign * pairs[key] < 0:
            kind = "antagonism: together they do worse than their separate effects add up to"
        sentences.append(
            f"The strongest pair interaction is {key} = {_num(pairs[key])} ({a}'s effect changes by that much "
            f"when {b} is switched on; {kind}{sig(key)})."
        )
    elif len(components) > 1:
        sentences.append("No pair interaction is identifiable from the subsets present.")
    if e["missing_subsets"]:
        sentences.append(f"{len(e['missing_subsets'])} of {2 ** len(components)} subsets are missing.")
    if best:
        sentences.append(best)
    return " ".join(sentences)


def _effect_blocks(effects: dict, components: Sequence[str], metric: str, figdir: Path) -> tuple[list, list]:
    blocks: list[Block] = [Heading(f"Effects on {metric}", 3)]
    figures: list[Path] = []
    anova = effects["anova"]
    terms = anova["terms"] if anova else {}
    rows = []
    for c in components:
        cond = effects["matched_pairs"][c]
        rows.append(
            {
                "component": c,
                "main effect": _num(effects["main_effects"][c]),
                "Shapley": _num(effects["shapley"][c]),
                "ANOVA p": _p(terms[c]["p"]) if c in terms else "–",
                "matched pairs": f"{cond['pairs']}/{cond['of']}",
                "conditional effect": _num(cond["value"]),
            }
        )
    blocks.append(Table(pd.DataFrame(rows), f"Per-component effects on {metric} (n/a: not identifiable)"))
    if len(components) > 1:
        rows = []
        for key, value in effects["interactions"].items():
            quad = effects["matched_quads"][key]
            rows.append(
                {
                    "pair": key,
                    "interaction": _num(value),
                    "ANOVA p": _p(terms[key]["p"]) if key in terms else "–",
                    "complete contexts": f"{quad['contexts']}/{quad['of']}",
                    "conditional interaction": _num(quad["value"]),
                }
            )
        blocks.append(Table(pd.DataFrame(rows), f"Pair interactions on {metric}"))
    if effects["missing_subsets"]:
        blocks.append(Paragraph("Missing subsets: " + ", ".join(effects["missing_subsets"]) + "."))
    blocks.append(Bullets(tuple(effects["notes"])))
    slug = _slug(metric)
    path = plots.effects_bars(effects, components, metric, figdir / f"shapley_{slug}.png")
    figures.append(path)
    blocks.append(FigureBlock(path, f"Shapley values and main effects on {metric}"))
    if len(components) > 1:
        path = plots.interaction_heatmap(effects, components, metric, figdir / f"interactions_{slug}.png")
        figures.append(path)
        blocks.append(FigureBlock(path, f"Pair interactions on {metric}"))
    return blocks, figures


def _pareto_blocks(df: pd.DataFrame, primary: str, figdir: Path) -> tuple[list, list]:
    rows = complete_rows(df)
    blocks: list[Block] = []
    figures: list[Path] = []
    if not higher_is_better(primary):
        return blocks, figures
    for axis in _PARETO_AXES:
        if axis not in rows.columns:
            continue
        cols = rows[["variant", "family"]].assign(
            **{
                axis: pd.to_numeric(rows[axis], errors="coerce"),
                primary: pd.to_numeric(rows[primary], errors="coerce"),
            }
        )
        points = cols.groupby("variant", sort=False).agg(
            family=("family", "first"), **{axis: (axis, "mean"), primary: (primary, "mean")}
        )
        points = points[np.isfinite(points[axis]) & np.isfinite(points[primary])].reset_index()
        if len(points) < 2:
            continue
        path = plots.pareto_plot(
            points, axis, primary, figdir / f"pareto_{_slug(primary)}_vs_{_slug(axis)}.png"
        )
        figures.append(path)
        blocks.append(
            FigureBlock(path, f"{primary} against {axis}: variants on the bold front are not dominated")
        )
    if blocks:
        blocks.insert(0, Heading("Accuracy against retention and cost (Pareto fronts)", 2))
    return blocks, figures


def _search_blocks(study, figdir: Path) -> tuple[list, list, dict]:
    import optuna
    import optuna.visualization.matplotlib as ovm

    blocks: list[Block] = [Heading("Search", 2)]
    figures: list[Path] = []
    multi = len(study.directions) > 1
    names = getattr(study, "metric_names", None) or []
    kwargs: dict = {}
    if multi:
        kwargs = {"target": lambda t: t.values[0], "target_name": names[0] if names else "objective 0"}
    info: dict = {"study_name": study.study_name, "directions": [d.name.lower() for d in study.directions]}
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    info["n_complete"] = len(done)
    if not done:
        blocks.append(Paragraph("No COMPLETE trial in the Optuna study."))
        return blocks, figures, info
    if multi:
        info["best_trials"] = [
            {"number": t.number, "params": t.params, "values": t.values} for t in study.best_trials
        ]
        best = study.best_trials[0]
        blocks.append(Paragraph(f"{len(study.best_trials)} Pareto-optimal trials; the first is shown below."))
    else:
        best = study.best_trial
        info["best_trial"] = {"number": best.number, "params": best.params, "value": best.value}
    info["best_params"] = dict(best.params)
    blocks.append(Paragraph(f"Best configuration (trial {best.number}, objective {best.values}):"))
    blocks.append(Code(json.dumps(best.params, indent=2, default=str), "json"))
    try:
        importances = optuna.importance.get_param_importances(
            study, **({"target": kwargs["target"]} if multi else {})
        )
        info["param_importances"] = {k: float(v) for k, v in importances.items()}
        blocks.append(
            Table(
                pd.DataFrame(
                    {"parameter": list(importances), "importance": [f"{v:.3f}" for v in importances.values()]}
                ),
                "Optuna parameter importances (one parameter at a time: interactions are not captured)",
            )
        )
    except Exception as err:  # Optuna refuses e.g. a study whose parameters never vary
        info["param_importances"] = None
        blocks.append(Paragraph(f"Parameter importances not available: {err}"))
    for name, draw, caption in (
        ("optuna_importances", ovm.plot_param_importances, "Optuna parameter importances"),
        ("optuna_history", ovm.plot_optimization_history, "Optimisation history"),
        ("optuna_parallel", ovm.plot_parallel_coordinate, "Parallel coordinates of the trials"),
    ):
        try:
            path = plots.optuna_figure(draw, figdir / f"{name}.png", study=study, **kwargs)
        except Exception as err:  # too few trials or no varying parameter: say so instead of failing
            blocks.append(Paragraph(f"{caption}: not available ({err})."))
            continue
        figures.append(path)
        blocks.append(FigureBlock(path, caption))
    return blocks, figures, info


def build_report(
    df: pd.DataFrame,
    *,
    components: list[str],
    metrics: list[str],
    out_dir: Path,
    title: str,
    study_kind: Literal["ablation", "search"] = "ablation",
    optuna_study=None,
) -> ReportFiles:
    """Write ``report.md``, ``report.html``, ``figures/*.png``, ``results.csv`` and ``effects.json``.

    ``df`` is the study results table (one row per trial, as ``harness.tracking.load_results`` returns it; only COMPLETE rows are analysed).
    The component effects use the factorial rows only (UniSD variants and SDFT, the empty subset); the
    results table shows every variant. When the table has at least two benchmark metrics and no
    ``mean.acc``, their unweighted mean is added as ``overall``, as in the paper. ``optuna_study``, for a
    search study, adds parameter importances, the optimisation history, parallel coordinates and the best
    configuration (also stored in effects.json under ``"_search"``).
    """
    components, metrics = list(components), list(metrics)
    _validate(df, components, metrics, study_kind)
    out_dir = Path(out_dir)
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for old in figdir.glob("*.png"):  # a re-run must not leave figures of metrics no longer reported
        old.unlink()

    table = ensure_variant_columns(df, components)
    table, analysed = with_overall(table, metrics)
    primary = primary_metric(analysed)
    results_csv = out_dir / "results.csv"
    (table.sort_values("trial") if "trial" in table.columns else table).to_csv(results_csv, index=False)

    stats = variant_stats(table, analysed, components)
    factorial = factorial_rows(table)
    effects = {m: analyse_effects(factorial, components, m) for m in analysed} if components else {}

    done = complete_rows(table)
    seeds = done["seed"].nunique() if "seed" in done.columns else None
    blocks: list[Block] = [
        Paragraph(
            f"{study_kind.capitalize()} study: {len(table)} trials, {len(done)} COMPLETE"
            + (f", {seeds} seed(s)" if seeds is not None else "")
            + f"; components: {', '.join(components)}; metrics: {', '.join(analysed)}; primary metric: {primary}."
        ),
    ]
    display, refs = results_table(stats, analysed, primary)
    blocks += [Heading("Conclusions", 2), Paragraph(_conclusions(effects, components, primary, stats, refs))]
    blocks += [
        Heading("Results", 2),
        Table(
            display,
            "Mean ± standard deviation over seeds (COMPLETE trials); base, baselines, then UniSD variants"
            + (
                f"; strongest baseline on {primary}: {refs['best_baseline']}" if refs["best_baseline"] else ""
            ),
        ),
    ]
    for key, label in (("base", "the base model"), ("best_baseline", "the strongest baseline")):
        if refs[key]:
            blocks.append(
                Table(
                    delta_table(stats, analysed, refs[key]), f"Δ against {label} ({refs[key]}), every metric"
                )
            )
    blocks.append(
        Table(ci_table(stats, analysed), "95% confidence interval of the mean over seeds (Student t)")
    )
    paper_section, paper_data = paper_blocks(table, components, analysed)  # per model and cell (harness.report.paper)
    blocks += paper_section

    figures: list[Path] = []
    if components:
        blocks.append(Heading("Component effects", 2))
        blocks.append(
            Paragraph(
                "Main effect: mean of the metric over subsets with the component minus the mean over subsets without "
                "it, averaging first over seeds within each subset, then over subsets. Shapley value: exact, over "
                "all 2^n subsets. Interaction a×b: the effect of a when b is on minus its effect when b is off, "
                "averaged over the other components. Quantities that need a missing subset are n/a; the conditional "
                "columns average only over the contexts present. Rows used: UniSD variants and SDFT (the empty "
                "subset)."
            )
        )
        for m in analysed:
            more, figs = _effect_blocks(effects[m], components, m, figdir)
            blocks += more
            figures += figs
        best = best_subsets(effects, analysed)
        if len(best):
            blocks += [
                Heading("Best subset per benchmark", 2),
                Table(best, "Highest seed-mean subset per metric"),
            ]
    more, figs = _pareto_blocks(table, primary, figdir)
    blocks += more
    figures += figs

    payload: dict = dict(effects)
    if paper_data:
        payload["_paper"] = paper_data
    if optuna_study is not None:
        more, figs, info = _search_blocks(optuna_study, figdir)
        blocks += more
        figures += figs
        payload["_search"] = info

    effects_json = out_dir / "effects.json"
    effects_json.write_text(
        json.dumps(jsonable(payload), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    markdown = out_dir / "report.md"
    markdown.write_text(to_markdown(title, blocks, out_dir), encoding="utf-8")
    page = out_dir / "report.html"
    page.write_text(to_html(title, blocks), encoding="utf-8")
    return ReportFiles(out_dir, markdown, page, results_csv, effects_json, tuple(figures))
