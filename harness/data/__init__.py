"""Benchmark data: one loader per benchmark, one record type, local files or the hub.

``load_benchmark(name, split, data_dir=..., limit=..., seed=...)`` returns :class:`Example` records
whose prompts are chat messages and whose demonstrations end in the canonical answer format. Local
files (``data_dir``, else ``$UNISD_DATA_DIR``) take precedence over the Hugging Face hub.
"""

from __future__ import annotations

from harness.data.errors import DataNotFoundError
from harness.data.records import Example
from harness.data.registry import BENCHMARKS, Benchmark, load_benchmark, load_plugins, register_benchmark

__all__ = ["BENCHMARKS", "Benchmark", "DataNotFoundError", "Example", "load_benchmark", "register_benchmark"]

load_plugins()  # last: a plugin module may import this package's names
