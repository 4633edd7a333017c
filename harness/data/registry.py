"""The benchmark registry (one :class:`Benchmark` record per benchmark) and ``load_benchmark``, the one
entry point to benchmark data.

Example::

    from harness.data import load_benchmark
    train = load_benchmark("scienceqa", "train", data_dir="../shared/data", limit=64, seed=0)
    train[0].messages, train[0].demonstration, train[0].answer
"""

from __future__ import annotations

import csv
import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType, ModuleType

from harness.data import cos_e, gpqa, humaneval, mbpp, scienceqa, toolalpaca
from harness.data.errors import DataFormatError
from harness.data.records import KINDS, PRIMARY_METRIC, Example
from harness.data.sources import resolve_data_dir, stable_hash
from harness.errors import HarnessError

__all__ = [
    "BENCHMARKS",
    "SCORINGS",
    "SPLITS",
    "TASKS_DIR",
    "Benchmark",
    "freeze_benchmarks",
    "load_plugins",
    "load_benchmark",
    "register_benchmark",
    "subsample",
]

SPLITS = ("train", "validation", "test")
SCORINGS = ("generative", "loglikelihood")
# The lm-eval task folders of the built-in benchmarks: ``<TASKS_DIR>/<name>/unisd_<name>[_ll].yaml``.
TASKS_DIR = Path(__file__).resolve().parent.parent / "evaluation" / "tasks"


@dataclass(frozen=True)
class Benchmark:
    """Everything the harness knows about a benchmark without loading it; every list of benchmark names
    (the spec's literal, the plan's size tables, the lm-eval task lookup) derives from these records.

    ``prompt_version`` is bumped whenever the benchmark's prompt or demonstration format changes;
    caches of generations or scores must include it in their key. ``sizes``: approximate examples per
    split (hub versions), for the plan's estimates. ``tasks``: scoring -> lm-eval task name (a
    multiple-choice benchmark may have a log-likelihood task; the others score generatively whatever the
    scoring asked). ``task_dir``: the folder holding those task YAMLs. ``transfer``: the evaluation-only
    benchmarks a model trained on this one is also scored on under the per-task protocol (module attribute
    ``TRANSFER``; the paper's pairs: scienceqa -> gpqa, mbpp -> humaneval).
    """

    name: str
    kind: str
    splits: tuple[str, ...]
    hub_id: str | None
    prompt_version: int
    module: ModuleType = field(repr=False, compare=False)
    sizes: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)
    tasks: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    task_dir: Path | None = field(default=None, repr=False, compare=False)
    transfer: tuple[str, ...] = field(default=(), repr=False, compare=False)

    @property
    def metric(self) -> str:
        """The primary metric's name (``acc`` or ``pass_at_1``): ``<name>.<metric>`` in results."""
        return PRIMARY_METRIC[self.kind]

    @property
    def trainable(self) -> bool:
        return "train" in self.splits

    def task(self, scoring: str = "generative") -> str:
        """The lm-eval task that scores this benchmark under ``scoring``."""
        if scoring not in SCORINGS:
            raise HarnessError(f"unknown scoring {scoring!r}; use one of {', '.join(SCORINGS)}")
        return self.tasks.get(scoring, self.tasks["generative"])


def _record(module: ModuleType, task_dir: Path | None) -> Benchmark:
    """The record of a benchmark module; refuses one that could validate but not run."""
    name = getattr(module, "NAME", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"benchmark module {module.__name__}: NAME must be an identifier (got {name!r})")
    for hook in ("load_local", "load_hub"):
        if not callable(getattr(module, hook, None)):
            raise ValueError(f"benchmark {name}: module {module.__name__} has no loader {hook}(folder/split)")
    kind = getattr(module, "KIND", None)
    if kind not in KINDS:
        raise ValueError(f"benchmark {name}: KIND must be one of {', '.join(KINDS)} (got {kind!r})")
    splits = tuple(module.SPLITS)
    if "test" not in splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"benchmark {name}: SPLITS must include 'test' and use {SPLITS} (got {splits})")
    transfer = tuple(getattr(module, "TRANSFER", ()))
    if transfer and "train" not in splits:
        raise ValueError(f"benchmark {name}: TRANSFER needs a training split (a model trained on {name})")
    folder = Path(task_dir) if task_dir is not None else TASKS_DIR / name
    tasks = {"generative": f"unisd_{name}"}
    if kind == "multiple_choice" and (folder / f"unisd_{name}_ll.yaml").is_file():
        tasks["loglikelihood"] = f"unisd_{name}_ll"
    if not (folder / f"unisd_{name}.yaml").is_file():
        raise ValueError(f"benchmark {name}: no lm-eval task {folder / f'unisd_{name}.yaml'}")
    sizes = dict(getattr(module, "SIZES", {}))
    missing = [s for s in ("train", "test") if s in splits and s not in sizes]
    if missing:
        raise ValueError(f"benchmark {name}: SIZES needs estimates for {missing} (the plan's cost model)")
    return Benchmark(
        name, kind, splits, module.HUB_ID, module.PROMPT_VERSION, module, MappingProxyType(sizes),
        MappingProxyType(tasks), folder, transfer,
    )  # fmt: skip


# Built-in benchmarks, in the order the spec lists them.
_BENCHMARKS: dict[str, Benchmark] = {
    m.NAME: _record(m, None) for m in (scienceqa, gpqa, mbpp, humaneval, cos_e, toolalpaca)
}
BENCHMARKS: Mapping[str, Benchmark] = MappingProxyType(_BENCHMARKS)
_frozen_by: list[str] = []


def register_benchmark(module: ModuleType, *, task_dir: str | Path | None = None) -> Benchmark:
    """Add a benchmark defined outside this package (a module with ``NAME``, ``KIND``, ``SPLITS``,
    ``HUB_ID``, ``PROMPT_VERSION``, ``SIZES``, ``load_local(folder, split)`` and ``load_hub(split)``).

    ``task_dir``: the folder of its lm-eval task ``unisd_<name>.yaml`` (and, for multiple choice,
    ``unisd_<name>_ll.yaml``); default ``harness/evaluation/tasks/<name>``. Call it before
    ``harness.spec`` is imported: the spec's benchmark literal is built once, from this registry.
    """
    record = _record(module, Path(task_dir) if task_dir is not None else None)
    if record.name in _BENCHMARKS:
        raise ValueError(f"benchmark {record.name!r} is already registered")
    if _frozen_by:
        raise RuntimeError(
            f"benchmark {record.name!r} registered after {_frozen_by[0]} was built from the registry; "
            "register it before importing harness.spec"
        )
    _BENCHMARKS[record.name] = record
    return record


def load_plugins() -> None:
    """Import the modules named in ``$UNISD_PLUGINS`` (comma-separated; the variable
    ``unisd_components.registry`` reads for mechanisms too): a benchmark defined outside the package
    registers itself on import, in every process of a study. Called when ``harness.data`` is imported."""
    for module in filter(None, (m.strip() for m in os.environ.get("UNISD_PLUGINS", "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise HarnessError(f"$UNISD_PLUGINS: cannot import {module!r}: {err}") from None


def freeze_benchmarks(by: str) -> Mapping[str, Benchmark]:
    """The registry, marked as read by ``by`` (a structure built once); later registrations fail."""
    if not _frozen_by:
        _frozen_by.append(by)
    return BENCHMARKS


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
        name: A key of :data:`BENCHMARKS` (``scienceqa``, ``gpqa``, ``mbpp``, ``humaneval``, ``cos_e``,
            ``toolalpaca``, and any registered with :func:`register_benchmark`).
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
