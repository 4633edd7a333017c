"""Sizing a study before it runs: what its design can tell apart, and the smallest difference it can see.

Why a module of its own: ``harness run --dry-run`` should let a user size a study before spending
GPU-hours, and the two answers it needs come from :mod:`harness.design` (which effects the planned
subsets identify, and at what cost against the full factorial) and :mod:`harness.report.paired` (the
minimum detectable paired difference for ``evaluation.limit`` questions and the study's seeds). The plan
module only calls :func:`design_summary` / :func:`mde_summary` and prints :func:`format_sizing`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from harness.design import recognise_design
from harness.report.paired import DISCORDANCE, SEED_SHARE, planned_mde

__all__ = ["design_summary", "format_sizing", "mde_summary"]


def design_summary(spec, subset_seconds: float) -> dict[str, Any] | None:
    """The design of the spec's component subsets: name, defining relation, alias chain of every main
    effect and pair interaction, and the GPU hours of the subset trials against the full factorial's.

    ``subset_seconds``: estimated GPU seconds of the planned subset trials (the empty subset included).
    None when the study has no component subsets.
    """
    subsets = list(spec.method.subset_list())
    if "sdft" in spec.method.baselines and () not in subsets:
        subsets.append(())  # SDFT is the empty subset: the report analyses it as a factorial row
    pool = [c for c in spec.method.components if any(c in s for s in subsets)]
    if not pool or len(subsets) < 2:
        return None
    runs = [tuple(int(c in s) for c in pool) for s in subsets]
    design = recognise_design(runs, pool)
    out: dict[str, Any] = {"components": pool, "subsets": len(subsets), "of": 2 ** len(pool)}
    out["subset_gpu_hours_7b"] = round(subset_seconds / 3600, 1)
    if design is None:
        out["name"] = None
        return out
    out["name"] = design.name()
    out["relation"] = design.relation()
    masks = [1 << i for i in range(len(pool))]
    masks += [(1 << i) | (1 << j) for i in range(len(pool)) for j in range(i + 1, len(pool))]
    out["aliases"] = {design.term(m): design.alias_chain(m) for m in masks}
    out["full_factorial_gpu_hours_7b"] = round(subset_seconds * 2**design.p / 3600, 1)
    return out


def mde_summary(spec, questions: Mapping[str, int]) -> dict[str, float]:
    """Per benchmark (and ``mean.acc``): the a-priori MDE of a paired difference between two variants,
    for ``questions[b]`` questions and the spec's seeds (assumptions in :func:`planned_mde`)."""
    seeds = len(spec.seeds)
    out = {b: planned_mde(n, seeds) for b, n in questions.items() if n > 0}
    if len(out) > 1:  # the unweighted mean over benchmarks: variances add, over B²
        out["mean.acc"] = math.sqrt(sum(v * v for v in out.values())) / len(out)
    return out


def format_sizing(plan: Mapping[str, Any]) -> list[str]:
    """The ``--dry-run`` lines of :func:`design_summary` and :func:`mde_summary` (in ``plan``)."""
    lines: list[str] = []
    design = plan.get("design")
    if design:
        if design["name"] is None:
            lines.append(
                f"  design     {design['subsets']} of {design['of']} subsets of {', '.join(design['components'])}: "
                "neither a full factorial nor a regular fraction (main effects not identifiable; "
                "conditional effects only)"
            )
        else:
            cost = f"subset trials ~{design['subset_gpu_hours_7b']:,} GPU hours"
            if design["full_factorial_gpu_hours_7b"] != design["subset_gpu_hours_7b"]:
                cost += f" (the full factorial's: ~{design['full_factorial_gpu_hours_7b']:,})"
            lines.append(
                f"  design     {design['name']}: {design['subsets']} of {design['of']} subsets; {cost}"
            )
            lines.append(f"  relation   {design['relation']}")
            aliased = {t: c for t, c in design["aliases"].items() if c != t}
            if aliased:
                lines.append("  aliases    " + "; ".join(aliased.values()))
            else:
                lines.append("  aliases    none: every main effect and interaction is identifiable")
    mde = plan.get("mde")
    if mde:
        lines.append(
            "  MDE        "
            + ", ".join(f"{b} {v:.3f}" for b, v in mde.items())
            + f"  [paired difference, 80% power, 5% level, {len(plan['seeds'])} seed(s); assumes two variants"
            f" disagree on {DISCORDANCE:.0%} of questions, {SEED_SHARE:.0%} of it seed noise]"
        )
    return lines
