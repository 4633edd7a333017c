"""One trial end to end: load the model, train the variant, evaluate it, return its metrics.

Why a function of (point, spec, ctx) and nothing else: the study runner owns Optuna and the worker
processes; a trial only needs what to train (the plan's point), how (the spec) and where to put things
(the context). What it writes, in ``ctx.trial_dir`` (``<output_dir>/trials/<number>/``):
``variant.json`` (the resolved variant and training configs), ``history.json`` (per-step training
metrics), ``eval/`` (per-sample logs of the evaluation). The same files go to the trial's MLflow run.

Shared per study, under ``ctx.cache_dir`` (``<output_dir>/cache``): the trainer's caches (teacher
contexts, retrieval embeddings, negative demonstrations), the evaluation's caches (base samples for
retention), and ``base_eval/``: the base model's evaluation, computed once and reused by every ``base``
point (e.g. one per seed). Shared per process: one untouched copy of the base model, the retention
reference for every trial and the starting point that each trained variant copies.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.data.training import load_train_examples
from harness.progress import StudyProgress
from unisd_components.cache import read_json

if TYPE_CHECKING:
    from harness.spec import StudySpec
    from harness.tracking import TrialRun

__all__ = ["TrialContext", "run_trial", "warm_up"]

# Dev-set evaluations that feed the pruner, per trial (at evenly spaced optimizer steps).
PRUNING_REPORTS = 4


@dataclass
class TrialContext:
    """Where a trial writes and whom it tells. ``run`` and ``optuna_trial`` may be None (plain use)."""

    number: int
    output_dir: Path
    trial_dir: Path
    cache_dir: Path
    run: TrialRun | None = None
    progress: StudyProgress = field(default_factory=StudyProgress)
    optuna_trial: Any = None  # set when the study prunes: run_trial reports the dev metric to it
    processes: int = 1  # > 1: train over that many processes, one GPU each (harness.data_parallel)


# --------------------------------------------------------------------------------------------------
# Per-process shared state


_BASE: dict[tuple, tuple[Any, Any]] = {}


def _base_model(spec: StudySpec):
    """The untouched base model and tokenizer, loaded once per process."""
    from harness.models import load_model

    key = (spec.model.ref, spec.model.device, spec.model.dtype)
    if key not in _BASE:
        _BASE.clear()  # one base model per process, whatever the study
        _BASE[key] = load_model(spec.model.ref, device=spec.model.device, dtype=spec.model.dtype)
    return _BASE[key]


# --------------------------------------------------------------------------------------------------
# Evaluation


def _engine(spec: StudySpec, model, processes: int = 1):
    """The process's vLLM engine when ``generation.engine`` resolves to it (harness.generation_engine)."""
    from harness.generation_engine import engine_for

    return engine_for(spec, next(model.parameters()).device.type, processes)


def _evaluate(
    model, tokenizer, spec: StudySpec, ctx: TrialContext, base_model
) -> tuple[dict[str, float], float]:
    from harness.evaluation import evaluate_model

    ev = spec.evaluation
    result = evaluate_model(
        model,
        tokenizer,
        ev.benchmarks,
        split=ev.split,
        limit=ev.limit,
        batch_size=ev.batch_size,
        output_dir=ctx.trial_dir / "eval",
        data_dir=spec.data.data_dir,
        seed=spec.data.split_seed,
        scoring=ev.scoring,
        max_gen_tokens=ev.max_gen_tokens,
        base_model=base_model,
        ppl_fit=ev.ppl_fit,
        retention=ev.retention,
        cache_dir=ctx.cache_dir / "eval",
        engine=_engine(spec, model),
    )
    if ctx.run is not None:
        ctx.run.log_artifact(ctx.trial_dir / "eval", "eval")
    return dict(result.metrics), float(result.seconds)


def _base_eval_key(spec: StudySpec) -> str:
    payload = {
        "model": spec.model.model_dump(mode="json"),
        "evaluation": spec.evaluation.model_dump(mode="json"),
        "data_dir": spec.data.data_dir,
        "split_seed": spec.data.split_seed,
        "generation_engine": spec.generation.engine,  # vLLM's greedy answers may differ in float ties
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, default=str)
    os.replace(tmp, path)


def _evaluate_base(spec: StudySpec, ctx: TrialContext) -> tuple[dict[str, float], float]:
    """The base model's scores, computed once per study and evaluation settings, then reused."""
    cache = ctx.cache_dir / "base_eval" / f"{_base_eval_key(spec)}.json"
    cached = read_json(cache, check=lambda v: isinstance(v, dict) and isinstance(v.get("metrics"), dict))
    if cached is not None:  # an unreadable entry is discarded with a warning and evaluated again
        ctx.progress.trial_phase(f"base evaluation reused from trial {cached['trial']}")
        if ctx.run is not None:
            ctx.run.set_tags({"base_eval_reused_from": cached["trial"]})
        return dict(cached["metrics"]), 0.0
    model, tokenizer = _base_model(spec)
    ctx.progress.trial_phase("evaluating")
    metrics, seconds = _evaluate(model, tokenizer, spec, ctx, model if spec.evaluation.retention else None)
    _write_json_atomic(cache, {"trial": ctx.number, "metrics": metrics, "seconds": seconds})
    return metrics, seconds


# --------------------------------------------------------------------------------------------------
# Training


class _StepCallback:
    """The trainer's per-step callback: MLflow curve, progress, and (when pruning) dev-set reports."""

    def __init__(self, spec: StudySpec, ctx: TrialContext, model, tokenizer, total_steps: int) -> None:
        self.spec, self.ctx, self.model, self.tokenizer = spec, ctx, model, tokenizer
        self.history: list[dict[str, float]] = []
        every = max(1, total_steps // PRUNING_REPORTS)
        self.report_at = set(range(every, total_steps + 1, every)) if ctx.optuna_trial is not None else set()

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append({"step": step, **metrics})
        if self.ctx.run is not None:
            self.ctx.run.log_step(step, metrics)
        self.ctx.progress.trial_step(step, metrics)
        if step in self.report_at:
            self._report_dev(step)

    def _report_dev(self, step: int) -> None:
        import optuna

        from harness.evaluation import evaluate_model

        metric = _dev_metric(self.spec)
        was_training, side = self.model.training, self.tokenizer.padding_side
        self.model.eval()
        try:
            self.ctx.progress.trial_phase(f"dev evaluation at step {step}")
            result = evaluate_model(
                self.model,
                self.tokenizer,
                list(self.spec.data.train),
                split="validation",
                limit=self.spec.data.dev_size,
                batch_size=self.spec.evaluation.batch_size,
                output_dir=self.ctx.trial_dir / "dev" / str(step),
                data_dir=self.spec.data.data_dir,
                seed=self.spec.data.split_seed,
                scoring=self.spec.evaluation.scoring,
                max_gen_tokens=self.spec.evaluation.max_gen_tokens,
                ppl_fit=metric == "ppl_fit",
                retention=False,
            )
        finally:
            self.model.train(was_training)
            self.tokenizer.padding_side = side
        value = float(result.metrics[metric])
        if self.ctx.run is not None:
            self.ctx.run.log_metrics({f"dev.{metric}": value}, step=step)
        trial = self.ctx.optuna_trial
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: dev {metric} = {value:.4g}")


def _dev_metric(spec: StudySpec) -> str:
    """The objective when the dev benchmarks (the training ones) can measure it; else a stand-in with the
    same direction (the pruner compares values in the study's direction): mean accuracy, or PPL fit."""
    objective = spec.search.objectives[0]
    metric = objective.metric
    bench = metric.split(".", 1)[0]
    if metric in ("mean.acc", "ppl_fit") or bench in spec.data.train:
        return metric
    return "mean.acc" if objective.direction == "maximize" else "ppl_fit"


def _trainable_copy(base, spec: StudySpec):
    """A copy of the base model to train, with fresh LoRA adapters when the spec asks for them."""
    from harness.models import with_spec_lora

    return with_spec_lora(copy.deepcopy(base), spec.model.lora)


def _train_in_processes(base, spec: StudySpec, variant, training, ctx: TrialContext, callback):
    """Train over ``ctx.processes`` GPUs in launched processes; return ``(trained model, TrainResult)``,
    the model being a copy of ``base`` (made once the processes are done) with the weights they saved."""
    from harness.data_parallel import load_trained_weights, train_in_processes

    ctx.progress.trial_phase(f"training over {ctx.processes} processes")
    if ctx.run is not None:  # the global batch is processes x training.batch_size: part of the result
        ctx.run.set_tags({"gpus_per_trial": ctx.processes})
    work_dir = ctx.trial_dir / "data_parallel"
    result = train_in_processes(
        ctx.processes,
        spec,
        variant,
        training,
        work_dir=work_dir,
        cache_dir=ctx.cache_dir / "train",
        callback=callback,
    )
    model = _trainable_copy(base, spec)
    load_trained_weights(model, work_dir)
    return model, result


def run_trial(point: Any, spec: StudySpec, ctx: TrialContext) -> dict[str, float]:
    """Train and evaluate one point of the plan; return its metrics (see the module docstring).

    Metrics: the evaluation's (``<bench>.acc``, ``mean.acc``, ``ppl_fit``, ``ppl_ret`` ...) plus
    ``train_seconds``, ``eval_seconds``, ``generated_tokens`` and ``train_steps``. Raises whatever
    training raises (``NonFiniteLossError``, out of memory): the runner records the trial as failed.
    """
    from harness.plan import planned_steps, point_training, point_variant
    from unisd_components.lora import merged_for_inference

    ctx.trial_dir.mkdir(parents=True, exist_ok=True)
    variant = point_variant(point)  # None: the untrained base model
    training = point_training(point, spec)
    config = {
        "variant": None if variant is None else variant.model_dump(mode="json"),
        "variant_name": "base" if variant is None else variant.name,
        "training": training.model_dump(mode="json"),
        "model": spec.model.model_dump(mode="json"),
    }
    _write_json_atomic(ctx.trial_dir / "variant.json", config)
    if ctx.run is not None:
        ctx.run.log_artifact(ctx.trial_dir / "variant.json")
    if variant is None:
        ctx.progress.trial_phase("loading base model")
        metrics, eval_seconds = _evaluate_base(spec, ctx)
        return {
            **metrics,
            "train_seconds": 0.0,
            "eval_seconds": eval_seconds,
            "generated_tokens": 0,
            "train_steps": 0,
        }

    ctx.progress.trial_phase("loading model")
    base, tokenizer = _base_model(spec)
    # Data-parallel: the training processes hold their own copies; this one is made after they finish.
    model = _trainable_copy(base, spec) if ctx.processes == 1 else None
    examples = load_train_examples(spec.data)
    total = planned_steps(training, len(examples), ctx.processes)
    ctx.progress.trial_steps(total)
    callback = _StepCallback(spec, ctx, model, tokenizer, total)
    start = time.perf_counter()
    try:
        if ctx.processes > 1:
            _engine(spec, base, ctx.processes)  # engine: vllm cannot sample for training processes: say so
            model, result = _train_in_processes(base, spec, variant, training, ctx, callback)
        else:
            from unisd_components.trainer import train_variant

            result = train_variant(
                model,
                tokenizer,
                examples,
                variant,
                training,
                cache_dir=ctx.cache_dir / "train",
                callback=callback,
                engine=_engine(spec, model),
            )
    finally:
        _write_json_atomic(ctx.trial_dir / "history.json", callback.history)
        if ctx.run is not None:
            ctx.run.log_artifact(ctx.trial_dir / "history.json")
    train_wall = time.perf_counter() - start
    model = merged_for_inference(model).eval()  # the same function, one matmul per projection
    ctx.progress.trial_phase("evaluating")
    metrics, eval_seconds = _evaluate(
        model, tokenizer, spec, ctx, base if spec.evaluation.retention else None
    )
    phases = {f"phase_seconds.{k}": float(v) for k, v in result.phase_seconds.items()}
    del model
    return {
        **metrics,
        **phases,
        # the trainer's own clock, plus the dev evaluations pruning needed (they are training time too)
        "train_seconds": max(float(result.train_seconds), train_wall),
        "eval_seconds": eval_seconds,
        "generated_tokens": int(result.generated_tokens),
        "train_steps": int(result.steps),
    }


def warm_up(spec: StudySpec) -> None:
    """Load what every trial of this process needs (base model, training examples, the training and
    evaluation stacks) ahead of time; the runner calls it in a thread while it sets up the stores."""
    _base_model(spec)
    if spec.data.train:
        load_train_examples(spec.data)
    import harness.evaluation.lmeval  # noqa: F401  (lm-eval's import takes seconds)
    import unisd_components.trainer  # noqa: F401
