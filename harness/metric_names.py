"""The one metric-name normaliser: lm-eval's ``<metric>,<filter>`` keys as names MLflow accepts.

Why one: the evaluation (``<benchmark>.<metric>`` from lm-eval's results) and the tracking (every metric
sent to MLflow) must agree on what a metric is called, or a study's objective ``mbpp.pass_at_1`` would
find ``mbpp.pass@1`` in one place and ``mbpp.pass_at_1_sandbox`` in another.

Rules: ``@`` becomes ``_at_``; lm-eval's filter suffix is dropped when it is ``none`` or when the caller
knows it is the only filter reporting that metric (``drop_filter``), else kept as ``_<filter>`` so two
filters of one metric stay apart; any character MLflow refuses becomes ``_``.
"""

from __future__ import annotations

import re

__all__ = ["normalise_metric_name"]

_REFUSED = re.compile(r"[^A-Za-z0-9_\-./ ]")


def normalise_metric_name(name: str, *, drop_filter: bool = False) -> str:
    """``acc,none`` -> ``acc``; ``pass@1,sandbox`` -> ``pass_at_1_sandbox`` (``pass_at_1`` with
    ``drop_filter``); ``scienceqa.acc`` unchanged."""
    name = name.replace("@", "_at_")
    head, _, filt = name.partition(",")
    name = head if drop_filter or filt in ("", "none") else f"{head}_{filt}"
    return _REFUSED.sub("_", name)
