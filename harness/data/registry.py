"""The benchmark registry and ``load_benchmark``, the one entry point to benchmark data.

Example::

    from harness.data import load_benchmark
    train = load_benchmark("scienceqa", "train", data_dir="../shared/data", limit=64, seed=0)
    train[0].messages, train[0].demonstration, train[0].answer
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from harness.data import cos_e, gpqa, humaneval, mbpp, scienceqa, toolalpaca
from harness.data.errors import DataFormatError
from harness.data.records import Example
from harness.data.sources import resolve_data_dir, stable_hash
from harness.errors import HarnessError

__all__ = ["BENCHMARKS", "SPLITS", "Benchmark", "load_benchmark", "subsample"]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Benchmark:
    """What callers may ask of a benchmark without loading it.

    ``prompt_version`` is bumped whenever the benchmark's prompt or demonstration format changes;
    caches of generations or scores must include it in their key.
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    hub_id: str | None
    prompt_version: int
    module: ModuleType = field(repr=False, compare=False)


def _entry(module: ModuleType) -> Benchmark:
    return Benchmark(module.NAME, module.KIND, module.SPLITS, module.HUB_ID, module.PROMPT_VERSION, module)


BENCHMARKS: dict[str, Benchmark] = {
    m.NAME: _entry(m) for m in (scienceqa, cos_e, mbpp, toolalpaca, gpqa, humaneval)
}


def subsample(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    """A seeded subset of ``limit`` examples, in the original order.

    Each example is ranked by a hash of (seed, id), so the same seed gives the same examples on every
    machine, a larger limit extends a smaller one, and the choice does not depend on list order.
    """
    if limit is None or limit >= len(examples):
        return list(examples)
    keep = set(sorted(range(len(examples)), key=lambda i: stable_hash(f"{seed}:{examples[i].id}"))[:limit])
    return [ex for i, ex in enumerate(examples) if i in keep]


def load_benchmark(
    name: str,
    split: str,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> list[Example]:
    """Load one split of a benchmark as :class:`Example` records.

    Args:
        name: A key of :data:`BENCHMARKS` (``scienceqa``, ``cos_e``, ``mbpp``, ``toolalpaca``, ``gpqa``,
            ``humaneval``).
        split: ``"train"``, ``"validation"`` or ``"test"``; gpqa and humaneval have ``"test"`` only.
        data_dir: Root holding ``<name>/`` in the layout of shared/data. None: ``$UNISD_DATA_DIR``; when
            that is unset too, the Hugging Face hub (``datasets.load_dataset``, needs network).
        limit: Keep a seeded random subset of this many examples (None: all).
        seed: Seed of that subset.

    Raises:
        HarnessError: unknown benchmark or split, or a negative limit.
        DataNotFoundError: the data is neither in the local folder nor reachable on the hub.
    """
    bench = BENCHMARKS.get(name)
    if bench is None:
        raise HarnessError(f"unknown benchmark {name!r}; valid benchmarks: {', '.join(sorted(BENCHMARKS))}")
    if split not in SPLITS:
        raise HarnessError(f"unknown split {split!r} for {name}; valid splits: {', '.join(bench.splits)}")
    if split not in bench.splits:
        raise HarnessError(
            f"{name} is evaluation-only: it has no {split!r} split (valid: {', '.join(bench.splits)})"
        )
    if limit is not None and limit < 0:
        raise HarnessError(f"limit must be >= 0 or None (got {limit})")
    root = resolve_data_dir(data_dir)
    if root is not None:
        try:
            examples = bench.module.load_local(root / name, split)
        except HarnessError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, csv.Error) as err:
            # the file parsed, but its records are not the benchmark's (a field missing, a wrong type)
            what = f"{type(err).__name__}: {err}"
            raise DataFormatError(f"{root / name}: {name} data is malformed ({what[:200]})") from None
    else:
        examples = bench.module.load_hub(split)
    return subsample(examples, limit, seed)
