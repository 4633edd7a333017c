"""lm-eval hooks of unisd_mbpp: docs from ``harness.data`` (see README.md), scoring from _common."""

from __future__ import annotations

from harness.evaluation.tasks._common import load_docs as _load_docs
from harness.evaluation.tasks._common import process_code as process_results
from harness.evaluation.tasks._common import sandbox_filter

__all__ = ["load_docs", "process_results", "sandbox_filter"]


def load_docs(**metadata):
    return _load_docs("mbpp", **metadata)
