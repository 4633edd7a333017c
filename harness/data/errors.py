"""The error a user sees when a benchmark's data cannot be found locally or on the hub."""

from __future__ import annotations

from harness.errors import HarnessError

__all__ = ["DataFormatError", "DataNotFoundError"]


class DataNotFoundError(HarnessError):
    """Benchmark data is missing. The one-line message names both ways to provide it: a local folder
    (spec ``data.data_dir`` or ``UNISD_DATA_DIR``) or Hugging Face hub access."""


class DataFormatError(HarnessError):
    """A benchmark file exists but cannot be read (truncated, not JSON, missing fields). The one-line
    message names the file and, for JSON, the line; the study stops before any training."""
