"""A study's axes made concrete for one trial: the spec a trial sees and where its caches live.

Why a module of its own: the plan (``harness.plan``) says which (model, training task, variant, seed)
a trial is; the trial itself (``harness.trial.run_trial``) knows one model, a list of training benchmarks
and a list of evaluation benchmarks. :func:`cell_spec` narrows the study spec to the trial's cell, so the
trial code needs no knowledge of the axes, and :func:`cell_cache_dir` keeps what one model generated
(contexts, negatives, base completions, base evaluations) apart from every other model while the variants
of one cell share it.

Example::

    spec = load_spec("studies/smoke_grid.yaml")
    point = grid_points(spec)[5]
    cell = cell_spec(spec, point)       # model: one ModelSpec; data.train: [point.train_task]
    cell_cache_dir(spec, point, Path("runs/x"))   # runs/x/cache/<model>/<task>
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from harness.spec import ModelSpec, StudySpec

__all__ = ["cell_cache_dir", "cell_label", "cell_spec", "model_of", "single_cell"]


def single_cell(spec: StudySpec) -> bool:
    """True for today's shape (one model, pooled training): trials keep their old keys and cache folder."""
    return len(spec.models()) == 1 and spec.data.protocol == "pooled"


def model_of(spec: StudySpec, name: str | None) -> ModelSpec:
    """The model section named ``name`` (the first model when ``name`` is None)."""
    models = spec.models()
    if name is None:
        return models[0]
    for model in models:
        if model.label == name:
            return model
    raise KeyError(f"no model named {name!r} in study {spec.name} (models: {[m.label for m in models]})")


def cell_spec(spec: StudySpec, point: Any) -> StudySpec:
    """The spec narrowed to ``point``'s cell: one model; under ``per_task`` its one training task and the
    benchmarks its model is scored on (the base model, ``train_task`` None, is scored on all of them)."""
    model = model_of(spec, getattr(point, "model", None))
    task = getattr(point, "train_task", None)
    update: dict[str, Any] = {"model": model}
    if spec.data.protocol == "per_task":
        if task is not None:
            update["data"] = spec.data.model_copy(update={"train": [task]})
        update["evaluation"] = spec.evaluation.model_copy(update={"benchmarks": spec.cell_benchmarks(task)})
    narrowed = spec.model_copy(update=update)
    narrowed._source = spec.source
    return narrowed


def cell_cache_dir(spec: StudySpec, point: Any, output_dir: Path) -> Path:
    """``<output_dir>/cache`` for a one-model pooled study (as before); else ``cache/<model>/<task>``
    (``base`` for the base model's evaluation, ``pooled`` for pooled training): never shared across models."""
    root = Path(output_dir) / "cache"
    if single_cell(spec):
        return root
    model = model_of(spec, getattr(point, "model", None)).label
    task = getattr(point, "train_task", None)
    if task is None:
        task = "base" if getattr(point, "variant", None) is None else "pooled"
    return root / model / task


def cell_label(train_task: str | None, benchmark: str) -> str:
    """A results cell as the paper labels it: ``scienceqa`` in domain, ``gpqa ← scienceqa`` for transfer."""
    if train_task is None or train_task == benchmark:
        return benchmark
    return f"{benchmark} ← {train_task}"
