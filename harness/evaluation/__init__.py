"""Evaluation: lm-eval tasks per benchmark, sandboxed code execution, PPL fit and retention.

``evaluate_model`` is imported lazily so that ``harness.evaluation.sandbox`` and ``metrics`` stay cheap to
import (lm-eval and torch take seconds).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["EvalResult", "evaluate_model"]

if TYPE_CHECKING:
    from harness.evaluation.lmeval import EvalResult, evaluate_model


def __getattr__(name: str) -> Any:
    if name in __all__:
        from harness.evaluation import lmeval

        return getattr(lmeval, name)
    raise AttributeError(f"module 'harness.evaluation' has no attribute {name!r}")
