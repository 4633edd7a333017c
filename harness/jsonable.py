"""``jsonable``: any nested result (dicts, lists, numpy scalars, non-finite floats) as strict JSON data.

Why one helper: per-sample evaluation logs and the report's ``effects.json`` both write values that
``json.dumps`` refuses or writes as invalid JSON (``NaN``, numpy types, lm-eval objects).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["jsonable"]


def jsonable(value: Any) -> Any:
    """Dicts (keys as strings) and lists recursively; numpy scalars as Python numbers; NaN/inf as None;
    anything else that JSON cannot hold as its ``str``."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, int | bool | str) or value is None:
        return value
    return str(value)
