"""The error a user sees when a benchmark's data cannot be found locally or on the hub."""

from __future__ import annotations

from harness.errors import HarnessError

__all__ = ["DataNotFoundError"]


class DataNotFoundError(HarnessError):
    """Benchmark data is missing. The one-line message names both ways to provide it: a local folder
    (spec ``data.data_dir`` or ``UNISD_DATA_DIR``) or Hugging Face hub access."""
