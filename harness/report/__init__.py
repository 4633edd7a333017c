"""Component-interaction reports: which UniSD components drive the gains, and how they interact.

Example::

    from harness.report import build_report
    files = build_report(df, components=["agreement", "ema"], metrics=["mean.acc", "ppl_ret"],
                         out_dir=Path("reports/my_study"), title="My study")
    files.html  # self-contained: figures embedded

``analyse_effects(df, components, metric)`` gives the numbers alone (main effects, Shapley values, pair
interactions, ANOVA p-values) for one metric.
"""

from __future__ import annotations

from harness.report.build import ReportFiles, build_report
from harness.report.effects import analyse_effects
from harness.report.sources import read_results_csv, report_for_study, report_from_csv

__all__ = [
    "ReportFiles",
    "analyse_effects",
    "build_report",
    "read_results_csv",
    "report_for_study",
    "report_from_csv",
]
