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
from harness.report.comparisons import (
    comparison_table,
    distinguishable_sentence,
    format_ci,
    mde_summary,
    paired_metrics,
    run_comparisons,
)
from harness.report.effects import complete_rows
from harness.report.factorial import design_effects, varied_components
from harness.report.paired import compare
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

    Significance words appear only next to an ANOVA p-value or a least-squares CI; without one the numbers
    speak alone.
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

    fit = _fit_by_term(e)

    def sig(term: str) -> str:
        t = fit.get(term)
        if (anova is None or term not in anova["terms"]) and t and t["ci_low"] is not None:
            verdict = "distinguishable from noise" if t["ci_low"] > 0 or t["ci_high"] < 0 else "within noise"
            return f"; 95% CI [{t['ci_low']:+.3g}, {t['ci_high']:+.3g}], {verdict}"
        if anova is None or term not in anova["terms"]:
            return ""
        p = anova["terms"][term]["p"]
        verdict = "significant" if p < _SIGNIFICANCE else "not significant"
        shown = "p < 1e-4" if p < 1e-4 else f"p = {_p(p)}"
        return f"; ANOVA {shown}, {verdict} at the 5% level"

    design = e.get("design")
    if design and design["resolution"] is not None:
        sentences.append(
            f"The factorial rows form a {design['name']} ({design['runs']} of {design['of']} subsets, "
            f"{design['relation']}): each estimate below stands for its alias chain."
        )
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
        sentences.append(
            f"On {primary} ({direction} is better), no component improves the score (by {label})."
        )
    if losses:
        sentences.append(
            "Working against it: " + ", ".join(f"{c} ({_num(values[c])}{sig(c)})" for c in losses) + "."
        )
    pairs = {k: v for k, v in e["interactions"].items() if v is not None}
    if pairs and not any(pairs.values()):
        sentences.append("Every identifiable pair interaction is exactly zero.")
    elif pairs:
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


def _ci_text(est: float | None, lo: float | None, hi: float | None) -> str:
    if est is None or not math.isfinite(est):
        return "n/a"
    if lo is None or hi is None:
        return _num(est)
    return f"{est:+.3g} [{lo:+.3g}, {hi:+.3g}]"


def _fit_by_term(effects: dict) -> dict[str, dict]:
    """The least-squares terms by name. On a full factorial with unequal seeds per subset the displayed
    effects are the subset-mean ones, so each CI is re-centred on them (same half-width)."""
    out = {t["term"]: dict(t) for t in effects.get("fit") or []}
    shown = {**effects.get("main_effects", {}), **effects.get("interactions", {})}
    for name, t in out.items():
        value = shown.get(name)
        if value is not None and t["ci_low"] is not None and t["estimate"] is not None:
            half = t["ci_high"] - t["estimate"]
            t.update(estimate=value, ci_low=value - half, ci_high=value + half)
    return out


def _effect_blocks(
    effects: dict, components: Sequence[str], metric: str, figdir: Path, paired: dict | None = None
) -> tuple[list, list]:
    """One metric's effects, in the form its design allows; what it cannot identify is said once."""
    blocks: list[Block] = [Heading(f"Effects on {metric}", 3)]
    figures: list[Path] = []
    design = effects.get("design")
    fit = _fit_by_term(effects)
    paired = paired or {}
    if design is None:
        have = [c for c in components if effects["matched_pairs"][c]["pairs"]]
        blocks.append(
            Paragraph(
                f"The {len(effects['subsets'])} subsets present (of {2 ** len(components)}) form neither a full "
                "factorial nor a regular fraction, so no main effect, interaction or Shapley value is "
                "identifiable"
                + (
                    "; below, each component's conditional effect over the matched on/off pairs present."
                    if have
                    else ", and no component has a matched on/off pair."
                )
                + (
                    f" Missing subsets: {', '.join(effects['missing_subsets'])}."
                    if effects["missing_subsets"]
                    else ""
                )
            )
        )
        if have:
            rows = []
            for c in have:
                cond = effects["matched_pairs"][c]
                rows.append(
                    {
                        "component": c,
                        "matched pairs": f"{cond['pairs']}/{cond['of']}",
                        "conditional effect": _num(cond["value"]),
                        "paired 95% CI (questions)": format_ci(paired.get(c)),
                    }
                )
            blocks.append(Table(pd.DataFrame(rows), f"Conditional effects on {metric} (matched pairs only)"))
        blocks.append(Bullets(tuple(effects["notes"])))
        return blocks, figures
    blocks.append(
        Paragraph(
            f"Design: {design['name']}, {design['runs']} of {design['of']} subsets; {design['relation']}."
        )
    )
    anova = effects["anova"]
    terms = anova["terms"] if anova else {}
    full = design["resolution"] is None
    rows = []
    for c in components:
        t = fit.get(c, {})
        row = {
            "component": c,
            "main effect [95% CI]": _ci_text(effects["main_effects"][c], t.get("ci_low"), t.get("ci_high")),
        }
        if full:
            row["Shapley"] = _num(effects["shapley"][c])
            row["ANOVA p"] = _p(terms[c]["p"]) if c in terms else "–"
        else:
            row["alias chain"] = t.get("chain", "")
        if paired:
            row["paired on − off [95% CI] (questions)"] = format_ci(paired.get(c))
        rows.append(row)
    blocks.append(Table(pd.DataFrame(rows), f"Per-component effects on {metric}"))
    if len(components) > 1:
        rows, aliased = [], []
        for key, value in effects["interactions"].items():
            t = fit.get(key, {})
            if value is None and not full:
                aliased.append(f"{key} (with {t.get('aliased_with')})")
                continue
            row = {"pair": key, "interaction [95% CI]": _ci_text(value, t.get("ci_low"), t.get("ci_high"))}
            if full:
                row["ANOVA p"] = _p(terms[key]["p"]) if key in terms else "–"
            else:
                row["alias chain"] = t.get("chain", "")
            rows.append(row)
        if rows:
            blocks.append(Table(pd.DataFrame(rows), f"Pair interactions on {metric}"))
        if aliased:
            blocks.append(
                Paragraph(
                    "Not separately identifiable in this fraction (aliased with a lower-order term): "
                    + ", ".join(aliased)
                    + "."
                )
            )
    if not full:
        blocks.append(
            Paragraph(
                "Shapley values are not computed: they average a component's contribution over all "
                f"{design['of']} subsets, and this fraction runs only {design['runs']} of them."
            )
        )
    blocks.append(Bullets(tuple(effects["notes"])))
    slug = _slug(metric)
    if full:
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


def _references(stats: pd.DataFrame, refs: dict) -> list[str]:
    """The base model, SDFT and the strongest baseline, each once, in that order."""
    names = set(stats["variant"])
    out = [refs["base"], "sdft" if "sdft" in names else None, refs["best_baseline"]]
    return [r for r in dict.fromkeys(out) if r]


def _component_contrasts(
    questions: pd.DataFrame, factorial: pd.DataFrame, varied: Sequence[str], metrics: dict[str, list[str]]
) -> dict[str, dict[str, dict | None]]:
    """Per metric and component: the paired difference of the subsets with it on against those with it off
    (a full factorial or a fraction: all of them; otherwise the matched on/off pairs present)."""
    rows = complete_rows(factorial)
    names: dict[tuple[int, ...], str] = {}
    for key, variant in zip(rows[list(varied)].astype(int).to_numpy(), rows["variant"], strict=True):
        names.setdefault(tuple(int(x) for x in key), str(variant))
    names = {k: v for k, v in names.items() if v in set(questions["variant"])}
    from harness.report.factorial import factorial_design

    design = factorial_design(rows, list(varied))
    out: dict[str, dict[str, dict | None]] = {}
    for m, benches in metrics.items():
        out[m] = {}
        for i, c in enumerate(varied):
            if design is not None:
                plus = [v for k, v in names.items() if k[i] == 1]
                minus = [v for k, v in names.items() if k[i] == 0]
            else:
                pairs = [
                    (v, names[k[:i] + (0,) + k[i + 1 :]])
                    for k, v in names.items()
                    if k[i] == 1 and k[:i] + (0,) + k[i + 1 :] in names
                ]
                plus, minus = [p for p, _ in pairs], [q for _, q in pairs]
            out[m][c] = compare(questions, plus, minus, benches) if plus and minus else None
    return out


def _paired_section(
    questions: pd.DataFrame | None,
    stats: pd.DataFrame,
    metrics: Sequence[str],
    primary: str,
    refs: dict,
    factorial: pd.DataFrame,
    varied: Sequence[str],
    seeds: int,
) -> tuple[list[Block], dict, dict, list, dict]:
    """Blocks, {"references"}, comparisons, MDE rows and component contrasts (empty without records)."""
    info: dict = {"references": []}
    if questions is None or not len(questions):
        return [], info, {}, [], {}
    pm = paired_metrics(questions, metrics, primary)
    if not pm:
        return [], info, {}, [], {}
    references = [r for r in _references(stats, refs) if r in set(questions["variant"])]
    info["references"] = references
    variants = [v for v in dict.fromkeys(stats["variant"]) if v in set(questions["variant"])]
    comparisons = run_comparisons(questions, variants, references, pm)
    shown = [m for m in metrics if m in pm]
    blocks: list[Block] = [
        Heading("Paired comparisons", 2),
        Paragraph(
            "Each cell: the variant's score minus the reference's, on the same questions, with a 95% CI from a "
            "paired bootstrap over questions (stratified by benchmark for the overall score; seeds resampled "
            "when there are several). p: McNemar's exact test (one seed each, 0/1 scores) or the sign test, "
            f"on {primary}. A CI that excludes 0 is a difference distinguishable from noise at this size."
        ),
    ]
    for ref in references:
        if comparisons[ref]:
            blocks.append(Table(comparison_table(comparisons[ref], shown, primary), f"Against {ref}"))
    mdes = mde_summary(comparisons, pm, seeds)
    if mdes:
        parts = [
            f"{r['metric']} {r['mde']:.3f} ({r['questions']} questions, {r['seeds']} seed(s)"
            + ("" if r["source"] == "observed" else "; assumed discordance")
            + ")"
            for r in mdes
        ]
        blocks.append(
            Paragraph(
                "Minimum detectable effect (MDE: the smallest paired difference found with 80% power at the 5% "
                "level, 2.80·σ_d/√n, σ_d the spread of the per-question differences observed above): "
                + "; ".join(parts)
                + ". Differences smaller than this are likely to go unnoticed at this study's size."
            )
        )
    pair_cis = _component_contrasts(questions, factorial, varied, pm) if varied else {}
    return blocks, info, comparisons, mdes, pair_cis


def _with_paired_deltas(display: pd.DataFrame, comparisons: dict, primary: str) -> pd.DataFrame:
    """The results table's Δ columns as "+0.028 [−0.110, +0.170]" where a paired comparison exists."""
    out = display.copy()
    for ref, by_variant in comparisons.items():
        col = f"Δ {primary} vs {ref}"
        if col not in out.columns:
            continue
        out[col] = [
            format_ci(by_variant.get(v, {}).get(primary)) if v in by_variant else cell
            for v, cell in zip(out["variant"], out[col], strict=True)
        ]
    return out


def build_report(
    df: pd.DataFrame,
    *,
    components: list[str],
    metrics: list[str],
    out_dir: Path,
    title: str,
    study_kind: Literal["ablation", "search"] = "ablation",
    optuna_study=None,
    questions: pd.DataFrame | None = None,
) -> ReportFiles:
    """Write ``report.md``, ``report.html``, ``figures/*.png``, ``results.csv`` and ``effects.json``.

    ``df`` is the study results table (one row per trial, as ``harness.tracking.load_results`` returns it; only COMPLETE rows are analysed).
    The component effects use the factorial rows only (UniSD variants and SDFT, the empty subset); the
    results table shows every variant. When the table has at least two benchmark metrics and no
    ``mean.acc``, their unweighted mean is added as ``overall``, as in the paper. ``optuna_study``, for a
    search study, adds parameter importances, the optimisation history, parallel coordinates and the best
    configuration (also stored in effects.json under ``"_search"``). ``questions``: per-question records
    (:func:`harness.report.sources.question_records`); with them the report leads with paired
    comparisons on the same questions and the minimum detectable effect per benchmark (effects.json
    ``"_paired"``, ``"_mde"``).
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
    varied = varied_components(factorial, components)
    effects = {m: design_effects(factorial, varied, m) for m in analysed} if varied else {}

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
    paired_blocks, paired, comparisons, mdes, pair_cis = _paired_section(
        questions, stats, analysed, primary, refs, factorial, varied, int(seeds or 1)
    )
    display = _with_paired_deltas(display, comparisons, primary)
    conclusions = _conclusions(effects, varied, primary, stats, refs)
    lead = " ".join(
        filter(
            None, [distinguishable_sentence(comparisons.get(r, {}), r, primary) for r in paired["references"]]
        )
    )
    unvaried = [c for c in components if c not in varied]
    if unvaried and components:
        conclusions += (
            f" Not varied in the factorial (switched on only in presets, or never): {', '.join(unvaried)}; "
            "presets are compared beside the factorial, never pooled into it."
        )
    blocks += [Heading("Conclusions", 2), Paragraph(" ".join(filter(None, [lead, conclusions])))]
    blocks += paired_blocks
    blocks += [
        Heading("Results", 2),
        Table(
            display,
            "Mean ± standard deviation over seeds (COMPLETE trials); base, baselines, then UniSD variants"
            + (f"; strongest baseline on {primary}: {refs['best_baseline']}" if refs["best_baseline"] else "")
            + ("; Δ: paired difference on the same questions [95% bootstrap CI]" if comparisons else ""),
        ),
    ]
    for key, label in (("base", "the base model"), ("best_baseline", "the strongest baseline")):
        if refs[key] and not comparisons:
            blocks.append(
                Table(
                    delta_table(stats, analysed, refs[key]), f"Δ against {label} ({refs[key]}), every metric"
                )
            )
    with_q = any(f"{m}_se" in table.columns for m in analysed)
    if not np.isfinite(stats["ci_low"].to_numpy(dtype=float)).any():
        blocks.append(
            Paragraph(
                "No confidence interval of the means: one seed per variant and no per-question standard errors "
                "in the table (the paired comparisons above, when present, carry the uncertainty)."
            )
        )
    else:
        blocks.append(
            Table(
                ci_table(stats, analysed),
                "95% confidence interval of the mean: "
                + (
                    "seed spread and per-question standard errors combined (normal)"
                    if with_q
                    else "over seeds (Student t)"
                ),
            )
        )
    blocks.append(
        Table(ci_table(stats, analysed), "95% confidence interval of the mean over seeds (Student t)")
    )
    paper_section, paper_data = paper_blocks(table, components, analysed)  # per model and cell (harness.report.paper)
    blocks += paper_section

    figures: list[Path] = []
    if varied:
        blocks.append(Heading("Component effects", 2))
        blocks.append(
            Paragraph(
                "Main effect: mean of the metric over subsets with the component minus the mean over subsets without "
                "it. Interaction a×b: the effect of a when b is on minus its effect when b is off, averaged over the "
                "other components. Full factorial: Shapley values exact over all 2^n subsets; a regular fraction: "
                "least squares on the ±1-coded rows, each estimate with its alias chain. Rows used: UniSD subsets "
                "and SDFT (the empty subset); base, SFT, GKD and presets are not pooled into the factorial."
            )
        )
        for m in analysed:
            more, figs = _effect_blocks(effects[m], varied, m, figdir, pair_cis.get(m))
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
    if comparisons:
        payload["_paired"] = {
            "references": paired["references"],
            "comparisons": comparisons,
            "components": pair_cis,
        }
    if mdes:
        payload["_mde"] = mdes
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
