"""lm-eval hooks of unisd_toolalpaca: docs from ``harness.data`` (see README.md), scoring from _common."""

from __future__ import annotations

from harness.evaluation.tasks._common import load_docs as _load_docs
from harness.evaluation.tasks._common import process_tool_call as process_results

__all__ = ["load_docs", "process_results"]


def load_docs(**metadata):
    return _load_docs("toolalpaca", **metadata)
