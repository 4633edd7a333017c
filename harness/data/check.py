"""Read every benchmark file a study needs before its first trial trains.

Why: a truncated or malformed file in ``data_dir`` used to surface as a bare ``JSONDecodeError`` in
every trial, after each had trained for minutes. Loading the splits up front costs a second (the files
are small and parsed once) and turns any data problem into one line naming the file, the line and what
is wrong (:class:`~harness.data.errors.DataFormatError`, or ``DataNotFoundError`` for a missing one),
which stops the study as a missing data folder does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harness.data.registry import BENCHMARKS, load_benchmark

if TYPE_CHECKING:
    from harness.spec import StudySpec

__all__ = ["check_study_data"]


def check_study_data(spec: StudySpec) -> None:
    """Load each (benchmark, split) the study trains or evaluates on; raise the loader's one-line error."""
    wanted: list[tuple[str, str]] = [(name, "train") for name in spec.data.train]
    if spec.data.dev_size:
        wanted += [(name, "validation") for name in spec.data.train]
    wanted += [(name, spec.evaluation.split) for name in spec.evaluation.benchmarks]
    seen: set[tuple[str, str]] = set()
    for name, split in wanted:
        bench = BENCHMARKS.get(name)
        if (name, split) in seen or bench is None or split not in bench.splits:
            continue  # unknown names and splits are the spec's and the evaluation's to report
        seen.add((name, split))
        load_benchmark(name, split, data_dir=spec.data.data_dir)
