"""From a validated spec to work: the trial points of a study.

Why a module of its own: the runner (Optuna, resume, workers) must not know how a spec's baselines,
subsets, presets and search spaces become trainable variants, and the ``--dry-run`` plan must count exactly
what the runner will run. Two entry points:

- :func:`grid_points` for ablations: every point exactly once (baselines first, then the component
  subsets, then presets, each x seeds, each ``{choices: ...}`` / integer range expanded as a grid axis).
  For a TPE/random search it returns the study's fixed points only: its baselines, with every search space
  at its default. The runner enqueues them keyed by :func:`point_key`.
- :func:`suggest_point` for searches: one point from an ``optuna.Trial``, every search space suggested
  under its parameter name (``agreement.gamma``, ``training.learning_rate``; ``variant`` when several
  subsets/presets compete).

Example::

    spec = load_spec("studies/smoke.yaml")
    [p.name for p in grid_points(spec)]     # ['sdft', 'unisd[ema]', 'unisd[clipping]', 'unisd[ema+clipping]']
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.data.registry import BENCHMARKS
from harness.errors import SpecError
from harness.spec import (
    COMPONENT_CONFIGS,
    PRESET_COMPONENTS,
    ChoiceSpace,
    FloatSpace,
    IntSpace,
    StudySpec,
    is_space,
    section_values,
)
from unisd_components.config import (
    COMPONENT_NAMES,
    GKDConfig,
    TrainingConfig,
    VariantConfig,
)
from unisd_components.presets import PRESETS, training_for_preset
from unisd_components.registry import REGISTRY

if TYPE_CHECKING:
    import optuna

__all__ = [
    "TrialPoint",
    "check_ema_syncs",
    "describe_plan",
    "format_plan",
    "grid_points",
    "point_key",
    "point_summary",
    "point_training",
    "plan_json_lines",
    "point_variant",
    "search_candidates",
    "suggest_point",
]


@dataclass
class TrialPoint:
    """One trial's work: a variant (None for the untrained base model), its training config and seed.

    ``params`` is flat for logging: ``comp.<name>`` (bool) for every component, ``method``, and every
    hyperparameter that shapes this point (``agreement.gamma``, ``training.learning_rate`` ...).
    ``grid`` holds the values a grid axis chose (part of :func:`point_key`). ``model`` (the model's
    short name) and ``train_task`` (None: pooled training, or the untrained base model) are the trial's
    coordinates on the study's other axes; ``preset`` names the recipe of a preset point.
    """

    name: str
    family: str  # "base" | "baseline" | "unisd"
    components: tuple[str, ...]
    seed: int
    variant: VariantConfig | None
    training: TrainingConfig
    params: dict[str, Any]
    grid: dict[str, Any] = field(default_factory=dict)
    model: str | None = None
    train_task: str | None = None
    preset: str | None = None
    key_prefix: str = ""  # "<model>/<task>/" when the study has more than one cell; part of point_key

    @property
    def variant_kind(self) -> str:
        """``base``, ``baseline``, ``factorial`` (a component subset; SDFT is the empty one) or ``preset``.

        The report's effects use ``factorial`` rows only: a preset shares a subset's components but not
        its hyperparameters (or batch), so it is reported beside the factorial, never inside a cell of it.
        """
        if self.preset:
            return "preset"
        if self.family == "unisd" or self.name == "sdft":
            return "factorial"
        return self.family


# --------------------------------------------------------------------------------------------------
# The raw (value-or-space) parameters of one kind of point


@dataclass(frozen=True)
class _Kind:
    """A variant before its spaces are resolved: a baseline, a subset or a preset."""

    name: str
    family: str
    method: str  # "base" | "sft" | "sdft" | "gkd"
    components: tuple[str, ...]
    preset: str | None = None


def _kinds(spec: StudySpec) -> list[_Kind]:
    """Baselines first, then subsets, then presets; the empty subset is the SDFT baseline (once)."""
    kinds: list[_Kind] = []
    for baseline in spec.method.baselines:
        family = "base" if baseline == "base" else "baseline"
        kinds.append(_Kind(baseline, family, baseline, ()))
    for subset in spec.method.subset_list():
        if not subset:
            if "sdft" not in spec.method.baselines:
                kinds.append(_Kind("sdft", "baseline", "sdft", ()))
            continue
        kinds.append(_Kind("unisd[" + "+".join(subset) + "]", "unisd", "sdft", subset))
    for preset in spec.method.presets:
        kinds.append(_Kind(preset, "unisd", "sdft", PRESET_COMPONENTS[preset], preset))
    return kinds


def search_candidates(spec: StudySpec) -> list[str]:
    """Names of the variants a TPE/random search chooses among (subsets and presets, not baselines)."""
    return [k.name for k in _kinds(spec) if k.name not in spec.method.baselines]


def _raw_params(kind: _Kind, spec: StudySpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values or spaces by parameter name, config defaults by parameter name) for one kind of point."""
    raw: dict[str, Any] = {}
    defaults: dict[str, Any] = {}
    if kind.method == "base":
        # Not trained, so nothing varies; its training config still records the study's settings.
        for key, value in section_values(spec.training).items():
            default = TrainingConfig.model_fields[key].default
            raw[f"training.{key}"] = _space_default(value, default) if is_space(value) else value
        return raw, defaults
    method = spec.method
    if kind.method == "sdft":
        preset = PRESETS[kind.preset] if kind.preset else None
        # A preset keeps its own values (unisd-method.md section 2); only method.preset_overrides.<name>
        # changes them. The component sections of `method` configure the factorial subsets.
        override = method.preset_overrides.get(kind.preset) if kind.preset else None
        for key in ("alpha", "kl_to_base_beta"):
            defaults[key] = VariantConfig.model_fields[key].default
            if preset is None:
                raw[key] = getattr(method, key)
            elif override is not None and key in override.model_fields_set:
                raw[key] = getattr(override, key)
            else:
                raw[key] = getattr(preset, key)
        for name in kind.components:
            config_cls = COMPONENT_CONFIGS[name]
            section = getattr(method, name)
            if preset is not None:
                values = getattr(preset, name).model_dump()
                if override is not None:
                    values.update(section_values(getattr(override, name), only_set=True))
            else:
                values = config_cls().model_dump()
                values.update(section_values(section, only_set=True))
            for key, value in values.items():
                raw[f"{name}.{key}"] = value
                defaults[f"{name}.{key}"] = config_cls.model_fields[key].default
    elif kind.method == "gkd":
        values = GKDConfig().model_dump()
        values.update(section_values(method.gkd, only_set=True))
        for key, value in values.items():
            raw[f"gkd.{key}"] = value
            defaults[f"gkd.{key}"] = GKDConfig.model_fields[key].default
        if "kl_to_base_beta" in method.model_fields_set:  # GKD samples on-policy too: the regulariser applies
            raw["kl_to_base_beta"] = method.kl_to_base_beta
            defaults["kl_to_base_beta"] = VariantConfig.model_fields["kl_to_base_beta"].default
    for key, value in section_values(spec.training).items():
        raw[f"training.{key}"] = value
        defaults[f"training.{key}"] = TrainingConfig.model_fields[key].default
    return raw, defaults


def _space_default(space: Any, config_default: Any) -> Any:
    """The value a fixed point (a baseline in a search) takes for a search space."""
    if space.default is not None:
        return space.default
    if isinstance(space, ChoiceSpace):
        return config_default if config_default in space.choices else space.choices[0]
    if config_default is not None and space.low <= config_default <= space.high:
        return config_default
    mid = math.sqrt(space.low * space.high) if space.log else (space.low + space.high) / 2
    return round(mid) if isinstance(space, IntSpace) else mid


def _grid_axis(space: Any) -> list[Any]:
    if isinstance(space, ChoiceSpace):
        return list(space.choices)
    if isinstance(space, IntSpace) and not space.log:
        return space.values()
    raise SpecError(f"a grid cannot enumerate {space!r}")  # the spec validator refuses this earlier


def _build(kind: _Kind, values: Mapping[str, Any], seed: int, grid: Mapping[str, Any]) -> TrialPoint:
    training_values = {k.removeprefix("training."): v for k, v in values.items() if k.startswith("training.")}
    training = TrainingConfig(**training_values, seed=seed)
    variant: VariantConfig | None
    if kind.method == "base":
        variant = None
    elif kind.method == "sft":
        variant = VariantConfig(method="sft")
    elif kind.method == "gkd":
        gkd = {k.removeprefix("gkd."): v for k, v in values.items() if k.startswith("gkd.")}
        variant = VariantConfig(
            method="gkd", gkd=GKDConfig(**gkd), kl_to_base_beta=values.get("kl_to_base_beta", 0.0)
        )
    else:
        sections = {
            name: COMPONENT_CONFIGS[name](
                **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith(name + ".")}
            )
            for name in kind.components
        }
        variant = VariantConfig(
            method="sdft", alpha=values["alpha"], kl_to_base_beta=values["kl_to_base_beta"], **sections
        )
        if kind.preset:
            training = training_for_preset(kind.preset, training)
    params: dict[str, Any] = {f"comp.{c}": c in kind.components for c in COMPONENT_NAMES}
    params["method"] = kind.method
    if kind.method != "base":  # the base model's params would be settings it never used
        params.update(values)
    if kind.preset:
        params["training.batch_size"] = training.batch_size
    return TrialPoint(
        name=kind.name,
        family=kind.family,
        components=kind.components,
        seed=seed,
        variant=variant,
        training=training,
        params=params,
        grid=dict(grid),
        preset=kind.preset,
    )


def _expand(kind: _Kind, spec: StudySpec, *, fixed: bool) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(values, grid choices) for every grid combination of a kind (one, with defaults, when ``fixed``)."""
    raw, defaults = _raw_params(kind, spec)
    spaces = {k: v for k, v in raw.items() if is_space(v)}
    if fixed:
        yield {k: _space_default(v, defaults[k]) if is_space(v) else v for k, v in raw.items()}, {}
        return
    axes = [[(key, value) for value in _grid_axis(space)] for key, space in spaces.items()]
    for combo in itertools.product(*axes):
        chosen = dict(combo)
        yield {**raw, **chosen}, chosen


def grid_points(spec: StudySpec) -> list[TrialPoint]:
    """Every point of a grid study, each exactly once; for a TPE/random study, its baseline points.

    Order: models (spec order), then training tasks, then baselines, subsets (by size), presets; within
    each, grid combinations, then seeds. Under ``per_task`` the base model is evaluated once per model
    (``train_task`` None, the first seed): it trains on nothing, and greedy evaluation has no seed.
    """
    from harness.axes import single_cell

    searching = spec.search.sampler != "grid"
    per_task = spec.data.protocol == "per_task"
    prefixed = not single_cell(spec)
    kinds = [k for k in _kinds(spec) if not (searching and k.name not in spec.method.baselines)]
    points: list[TrialPoint] = []
    for model in spec.models():
        if per_task:
            for kind in (k for k in kinds if k.method == "base"):
                for values, grid in _expand(kind, spec, fixed=searching):
                    point = _build(kind, _for_model(values, model), spec.seeds[0], grid)
                    points.append(_place(point, model.label, None, prefixed))
        for task in spec.train_tasks():
            for kind in kinds:
                if per_task and kind.method == "base":
                    continue
                for values, grid in _expand(kind, spec, fixed=searching):
                    for seed in spec.seeds:
                        point = _build(kind, _for_model(values, model), seed, grid)
                        points.append(_place(point, model.label, task, prefixed))
    return points


def _for_model(values: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """A model's own per-device batch (``model.batch_size``) replaces ``training.batch_size``."""
    out = dict(values)
    if model.batch_size is not None and "training.batch_size" in out:
        out["training.batch_size"] = model.batch_size
    return out


def _place(point: TrialPoint, model: str, task: str | None, prefixed: bool) -> TrialPoint:
    point.model, point.train_task = model, task
    if prefixed:
        point.key_prefix = f"{model}/{task or ('base' if point.variant is None else 'pooled')}/"
    return point


def planned_steps(training: Any, n_examples: int, processes: int = 1) -> int:
    """Optimizer steps the trainer will take (its own rule: micro-batches of the global batch per epoch)."""
    if training.max_steps is not None:
        return training.max_steps
    micro_per_epoch = math.ceil(n_examples / (training.batch_size * processes))
    return max(1, math.ceil(training.epochs * micro_per_epoch / training.grad_accum))


def check_ema_syncs(spec: StudySpec) -> None:
    """Refuse an EMA sync period longer than the optimizer steps a variant will take (issue 11 item 5):
    its teacher would never move and the variant would train as the one without EMA. The step count
    needs the training set's size, which the plan knows and the spec's validation does not: ``harness
    validate`` and ``harness run`` call it (the trainer refuses the same at its first step). A grid is
    checked point by point (each training cell's size, each point's own batch: a model's batch, a
    preset's); a search at the largest period its space allows, on the pooled training set."""
    from harness.axes import cell_spec

    def refuse(sync: int, steps: int, name: str, n_examples: int, tr: Any, where_in: str) -> None:
        where = f"{spec.source}: " if spec.source else ""
        raise SpecError(
            f"{where}method.ema.sync_steps: {sync} is more than the {steps} optimizer steps {name}{where_in} "
            f"takes ({n_examples} examples, batch {tr.batch_size} x grad_accum {tr.grad_accum}, "
            f"{tr.epochs} epoch(s)): its EMA teacher would never sync; lower it"
        )

    if spec.search.sampler == "grid":
        sizes: dict[tuple[str | None, str | None], int] = {}
        for point in grid_points(spec):
            variant = point.variant
            if variant is None or variant.ema is None:
                continue
            cell = (point.model, point.train_task)
            if cell not in sizes:
                sizes[cell] = _train_examples(cell_spec(spec, point))
            steps = planned_steps(point.training, sizes[cell])
            if variant.ema.sync_steps > steps:
                where_in = f" on {point.train_task}" if point.train_task else ""
                refuse(variant.ema.sync_steps, steps, point.name, sizes[cell], point.training, where_in)
        return
    n_examples = _train_examples(spec)
    for kind in _kinds(spec):
        if "ema" not in kind.components:
            continue
        for values, _ in _expand(kind, spec, fixed=True):
            point = _build(kind, values, spec.seeds[0], {})
            sync = _raw_params(kind, spec)[0]["ema.sync_steps"]
            if isinstance(sync, IntSpace):
                largest = sync.high
            elif isinstance(sync, ChoiceSpace):
                largest = max(int(c) for c in sync.choices)  # type: ignore[arg-type]
            else:
                largest = sync
            steps = planned_steps(point.training, n_examples)
            if largest > steps:
                refuse(largest, steps, kind.name, n_examples, point.training, "")


def suggest_point(trial: optuna.Trial, spec: StudySpec) -> TrialPoint:
    """One searched point: the variant (if several compete) and every search space, suggested by Optuna.

    The seed cycles through ``spec.seeds`` by trial number (one seed: always that one).
    """
    kinds = {k.name: k for k in _kinds(spec) if k.name not in spec.method.baselines}
    if not kinds:
        raise SpecError(f"{spec.name}: nothing to search (no subsets or presets beyond the baselines)")
    names = list(kinds)
    name = trial.suggest_categorical("variant", names) if len(names) > 1 else names[0]
    kind = kinds[name]
    raw, _ = _raw_params(kind, spec)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, FloatSpace):
            values[key] = trial.suggest_float(key, value.low, value.high, log=value.log, step=value.step)
        elif isinstance(value, IntSpace):
            values[key] = trial.suggest_int(key, value.low, value.high, step=value.step, log=value.log)
        elif isinstance(value, ChoiceSpace):
            values[key] = trial.suggest_categorical(key, value.choices)
        else:
            values[key] = value
    seed = spec.seeds[trial.number % len(spec.seeds)]
    model = spec.models()[0]  # a search runs one model on pooled data (the spec validator says so)
    return _place(_build(kind, _for_model(values, model), seed, {}), model.label, None, False)


def point_key(point: TrialPoint) -> str:
    """A stable id of a grid point: variant, seed and the grid axes' values (``unisd[ema]/seed=0``)."""
    key = f"{point.key_prefix}{point.name}/seed={point.seed}"
    for name in sorted(point.grid):
        key += f"/{name}={point.grid[name]!r}"
    return key


def point_summary(point: TrialPoint) -> dict[str, Any]:
    """JSON-ready facts of a point for Optuna user attributes and the MLflow run.

    ``components`` maps every component to a bool; ``params`` holds the hyperparameters (the component
    booleans live in ``components`` only).
    """
    return {
        "variant": point.name,
        "family": point.family,
        "variant_kind": point.variant_kind,
        "model": point.model,
        "train_task": point.train_task,
        "seed": point.seed,
        "components": {c: c in point.components for c in COMPONENT_NAMES},
        "params": {k: v for k, v in point.params.items() if not k.startswith("comp.")},
    }


def point_variant(point: TrialPoint) -> VariantConfig | None:
    return point.variant


def point_training(point: TrialPoint, spec: StudySpec | None = None) -> TrainingConfig:
    return point.training


# --------------------------------------------------------------------------------------------------
# The plan: counts and cost estimates for --dry-run

# Throughput assumptions for a 7B model in bf16 on one 80 GB H100-class GPU, HF transformers (no vLLM):
# batched `generate` decodes ~1,500 tokens/s over a batch of 16-32; a forward+backward pass (LoRA, gradient
# checkpointing) processes ~6,000 tokens/s; a gradient-free forward ~18,000 tokens/s. Average prompt length
# is taken as 300 tokens, average generated length as 60% of the cap (samples stop at EOS).
GEN_TOKENS_PER_S = 1500.0
# Generated tokens/s per engine, same 7B bf16 model on one H100-class GPU, as (training sampling at the
# step batch of ~16 prompts, evaluation with the whole benchmark submitted at once). Estimates, not
# measurements on this project's GPU studies (none yet); where each comes from:
# - hf (`generate`, eager, static batch): a decoding step of a 7B model takes ~30 ms whatever the batch
#   up to ~32 (kernel-launch bound), so ~530 tokens/s at 16 rows; evaluation batches of 8-16 likewise.
#   The old single figure, 1,500 tokens/s, is a vLLM-class rate that `generate` does not reach here.
# - vllm (paged attention, continuous batching, CUDA graphs): 75 tokens/s for one sequence of an 8B bf16
#   model on an A100-40GB (a public vLLM 0.23 concurrency sweep, 77% of the memory-bandwidth roofline),
#   x 3.35/1.55 for an H100's bandwidth ~ 160 tokens/s per sequence, x 16 rows at ~80% batching
#   efficiency (that sweep: 6.6x at 8) ~ 2,000 tokens/s; evaluation 5,000 tokens/s, well under the
#   ~12,500 tokens/s published for a saturated Llama-3.1-8B engine on one H100, because the colocated
#   engine keeps a ~30% share of the memory.
# - measured on a 2-core CPU (benchmarks/generation.py, SmolLM2-135M fp32): see its docstring for the
#   vllm/hf ratio of both phases.
ENGINE_GEN_TOKENS_PER_S: dict[str, tuple[float, float]] = {"hf": (530.0, 530.0), "vllm": (2000.0, 5000.0)}
TRAIN_TOKENS_PER_S = 6000.0
FORWARD_TOKENS_PER_S = 18000.0
MEAN_PROMPT_TOKENS = 300
MEAN_FILL = 0.6


def _size(benchmark: str, split: str, limit: int | None) -> int:
    """Examples taken from a split: the limit, or the whole split's (approximate, hub) size."""
    size = BENCHMARKS[benchmark].sizes[split]
    return min(limit, size) if limit else size


def _train_examples(spec: StudySpec) -> int:
    return sum(_size(b, "train", spec.data.train_size) for b in spec.data.train)


def _eval_examples(spec: StudySpec) -> int:
    return sum(_size(b, "test", spec.evaluation.limit) for b in spec.evaluation.benchmarks)


def _eval_generations(spec: StudySpec) -> int:
    """Prompts whose answers are generated: all under generative scoring; under loglikelihood, those of the
    benchmarks without a log-likelihood task (code, tool calls)."""
    ev = spec.evaluation
    benches = ev.benchmarks
    if ev.scoring == "loglikelihood":
        benches = [b for b in benches if "loglikelihood" not in BENCHMARKS[b].tasks]
    return sum(_size(b, "test", ev.limit) for b in benches)


def _trial_cost(point: TrialPoint, spec: StudySpec, engine: str | None = None) -> tuple[float, float, float]:
    """(upper bound of generated tokens, estimated generated tokens, estimated GPU seconds) of one trial.

    ``engine`` (``hf`` / ``vllm``): generation at that engine's rates (:data:`ENGINE_GEN_TOKENS_PER_S`);
    None: the single :data:`GEN_TOKENS_PER_S`.
    """
    train_rate, eval_rate = ENGINE_GEN_TOKENS_PER_S[engine] if engine else (GEN_TOKENS_PER_S,) * 2
    ev = spec.evaluation
    eval_gen = _eval_generations(spec) * ev.max_gen_tokens
    eval_prompts = _eval_examples(spec)
    # Scoring: log-likelihood/ppl passes over prompt + answer for every evaluated example.
    eval_forward = eval_prompts * (MEAN_PROMPT_TOKENS + MEAN_FILL * ev.max_gen_tokens) * (1 + ev.ppl_fit)
    if ev.retention and point.variant is not None:
        eval_forward += (
            eval_prompts * (MEAN_PROMPT_TOKENS + MEAN_FILL * ev.max_gen_tokens) * 3
        )  # base/trained
    upper, gen_tokens = float(eval_gen), MEAN_FILL * eval_gen
    seconds = gen_tokens / eval_rate + eval_forward / FORWARD_TOKENS_PER_S
    if point.variant is None:
        return upper, gen_tokens, seconds
    tr = point.training
    prompts = _train_examples(spec) * tr.epochs
    if tr.max_steps is not None:
        prompts = min(prompts, tr.max_steps * tr.batch_size * tr.grad_accum)
    completion = MEAN_FILL * tr.max_completion_tokens
    seq = min(tr.max_prompt_tokens, MEAN_PROMPT_TOKENS) + completion
    variant = point.variant
    on_policy = {"sft": 0.0, "gkd": variant.gkd.lmbda if variant.gkd else 0.5}.get(variant.method, 1.0)
    upper += on_policy * prompts * tr.max_completion_tokens
    gen_tokens += on_policy * prompts * completion
    # Student forward+backward once; teacher forwards: the demonstration teacher, then every component's
    # extra contexts (K agreement contexts, the negative context). What a component generates in its setup
    # (negatives) happens once per study: counted in describe_plan, not here.
    teacher_forwards = 1.0 if variant.method != "sft" else 0.0
    for name in variant.enabled_components():
        teacher_forwards += REGISTRY[name].extra_context_count(getattr(variant, name))
    seconds += on_policy * prompts * completion / train_rate
    seconds += prompts * seq / TRAIN_TOKENS_PER_S + prompts * seq * teacher_forwards / FORWARD_TOKENS_PER_S
    return upper, gen_tokens, seconds


def describe_plan(spec: StudySpec) -> dict[str, Any]:
    """What a study will run and roughly what it costs (``harness run --dry-run``).

    ``generated_tokens`` counts sampled tokens (training on-policy samples + evaluation answers); the
    ``upper_bound`` assumes every sample runs to its cap. ``gpu_hours_7b`` applies the throughput
    assumptions stated above this function to a 7B model on one GPU, whatever ``model.ref`` is.
    """
    from harness.axes import cell_spec

    fixed = grid_points(spec)
    searching = spec.search.sampler != "grid"
    cells = {(p.model, p.train_task, p.variant is None): cell_spec(spec, p) for p in fixed}
    costs = [_trial_cost(p, cells[(p.model, p.train_task, p.variant is None)]) for p in fixed]
    per_model_seconds = dict.fromkeys((m.label for m in spec.models()), 0.0)
    for p, c in zip(fixed, costs, strict=True):
        per_model_seconds[p.model or spec.models()[0].label] += c[2]
    n_search = spec.search.n_trials or 0
    if searching and n_search:
        # A searched trial costs about what the first candidate at its defaults costs.
        kind = next(k for k in _kinds(spec) if k.name not in spec.method.baselines)
        values, _ = next(_expand(kind, spec, fixed=True))
        searched = _trial_cost(_build(kind, values, spec.seeds[0], {}), spec)
        costs += [searched] * n_search
        per_model_seconds[spec.models()[0].label] += searched[2] * n_search
    shared_gen = 0.0
    generators = {c for k in _kinds(spec) for c in k.components if REGISTRY[c].generates_in_setup}
    for model in spec.models():  # generated once per model and cell, never shared across models
        model_gen = 0.0
        for task in spec.train_tasks():
            cell = cell_spec(spec, _Coordinates(model.label, task))
            if spec.evaluation.retention:
                model_gen += _eval_examples(cell) * spec.evaluation.max_gen_tokens  # base completions
            for _ in generators:  # e.g. the negative demonstrations: one per training example
                model_gen += _train_examples(cell) * spec.training.max_completion_tokens
        shared_gen += model_gen
        per_model_seconds[model.label] += MEAN_FILL * model_gen / GEN_TOKENS_PER_S
    variants = list(dict.fromkeys(p.name for p in fixed))
    if searching:
        variants += [n for n in search_candidates(spec) if n not in variants]
    upper = sum(c[0] for c in costs) + shared_gen
    estimate = sum(c[1] for c in costs) + MEAN_FILL * shared_gen
    seconds = sum(c[2] for c in costs) + MEAN_FILL * shared_gen / GEN_TOKENS_PER_S
    from harness.sizing import design_summary, mde_summary

    named = {"unisd[" + "+".join(s) + "]" if s else "sdft" for s in spec.method.subset_list()}
    subset_seconds = sum(c[2] for p, c in zip(fixed, costs, strict=False) if p.name in named)
    limit = spec.evaluation.limit
    questions = {b: _size(b, "test", limit) for b in spec.evaluation.benchmarks}
    axes = _axes(spec, fixed)
    by_engine = {}
    for engine, (_, eval_rate) in ENGINE_GEN_TOKENS_PER_S.items():
        engine_costs = [_trial_cost(p, cells[(p.model, p.train_task, p.variant is None)], engine) for p in fixed]
        if searching and n_search:
            engine_costs += [_trial_cost(_build(kind, values, spec.seeds[0], {}), spec, engine)] * n_search
        engine_seconds = sum(c[2] for c in engine_costs) + MEAN_FILL * shared_gen / eval_rate
        by_engine[engine] = round(engine_seconds / 3600, 1)
    return {
        "design": design_summary(spec, subset_seconds),
        "mde": mde_summary(spec, questions),
        "study": spec.name,
        "model": ", ".join(m.ref for m in spec.models()),
        "model_setup": "; ".join(
            m.dtype + (f", LoRA r={m.lora.r}" if m.lora.enabled else "") for m in spec.models()
        ),
        "axes": axes,
        "gpu_hours_per_model": {
            m.label: round(per_model_seconds[m.label] * _size_factor(m.ref) / 3600, 1) for m in spec.models()
        },
        "sampler": spec.search.sampler,
        "variants": variants,
        "n_variants": len(variants),
        "seeds": list(spec.seeds),
        "fixed_trials": len(fixed),
        "searched_trials": n_search if searching else 0,
        "timeout_s": spec.search.timeout,
        "n_trials": len(fixed) + (n_search if searching else 0),
        "train_benchmarks": list(spec.data.train),
        "eval_benchmarks": list(spec.evaluation.benchmarks),
        "train_examples_per_variant": _train_examples(spec),
        "eval_examples_per_trial": _eval_examples(spec),
        "objectives": [f"{o.metric} ({o.direction})" for o in spec.search.objectives],
        "search_space": sorted(spec.spaces()),
        "generated_tokens": {"estimate": int(estimate), "upper_bound": int(upper)},
        "gpu_hours_7b": round(seconds / 3600, 1),
        "gpu_hours_7b_by_engine": by_engine,
        "engine_rates": {
            e: f"{t:,.0f} tok/s sampling, {v:,.0f} tok/s evaluation"
            for e, (t, v) in ENGINE_GEN_TOKENS_PER_S.items()
        },
        "assumptions": (
            f"7B bf16 on one H100-class GPU: generation {GEN_TOKENS_PER_S:.0f} tok/s, training "
            f"{TRAIN_TOKENS_PER_S:.0f} tok/s, scoring {FORWARD_TOKENS_PER_S:.0f} tok/s; samples fill "
            f"{MEAN_FILL:.0%} of their cap; prompts ~{MEAN_PROMPT_TOKENS} tokens"
        ),
        "output_dir": str(spec.output_path),
        "storage": spec.storage_url,
        "tracking_uri": spec.tracking_uri,
    }


@dataclass
class _Coordinates:
    """A (model, training task) cell without a variant, for :func:`harness.axes.cell_spec`."""

    model: str
    train_task: str | None
    variant: Any = "trained"


def _axes(spec: StudySpec, points: list[TrialPoint]) -> dict[str, Any]:
    """The study's axes and their product: models x training tasks x trained variants x seeds, plus the
    base evaluations (one per model under ``per_task``)."""
    trained = [p for p in points if p.variant is not None]
    base = [p for p in points if p.variant is None]
    names = list(dict.fromkeys(p.name for p in trained))
    tasks = [t or "pooled" for t in spec.train_tasks()]
    return {
        "models": [m.label for m in spec.models()],
        "train_tasks": tasks,
        "protocol": spec.data.protocol,
        "trained_variants": names,
        "seeds": list(spec.seeds),
        "trained_trials": len(trained),
        "base_trials": len(base),
        "cells": {
            (t or "pooled"): spec.cell_benchmarks(t) for t in spec.train_tasks()
        },
    }


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([BbMm])(?![A-Za-z0-9])")


def _size_factor(ref: str) -> float:
    """GPU time relative to a 7B model, assumed proportional to the parameter count read from the name
    (``Llama-3.1-8B`` -> 8/7, ``SmolLM2-135M`` -> 0.135/7); a tiny random model costs ~0; unknown: 7B."""
    if ref.startswith("tiny-random:"):
        return 0.0
    if ref.startswith("bundled:"):
        ref = "135M"
    found = _SIZE.findall(ref.rsplit("/", 1)[-1])
    if not found:
        return 1.0
    number, unit = found[-1]
    billions = float(number) / (1000.0 if unit in "Mm" else 1.0)
    return billions / 7.0


def plan_json_lines(spec: StudySpec) -> list[dict[str, Any]]:
    """One JSON-ready object per trial (``harness run SPEC --dry-run --json``): its coordinates and the
    resolved hyperparameters its training uses (presets' own values and their batch included)."""
    out = []
    for point in grid_points(spec):
        params: dict[str, Any] = {}
        if point.variant is not None:
            params = {k: v for k, v in point.params.items() if not k.startswith("comp.")}
            params["components"] = list(point.components)
            params["training.batch_size"] = point.training.batch_size
        out.append(
            {
                "model": point.model,
                "train_task": point.train_task,
                "variant": point.name,
                "variant_kind": point.variant_kind,
                "seed": point.seed,
                "params": params,
            }
        )
    return out


def format_plan(plan: Mapping[str, Any]) -> str:
    """:func:`describe_plan`'s dict as the few lines ``harness validate`` and ``--dry-run`` print (the one
    plan formatter: both commands show the same facts the same way)."""
    from harness.sizing import format_sizing

    variants = plan["variants"]
    shown = ", ".join(variants[:10]) + (f", ... ({len(variants) - 10} more)" if len(variants) > 10 else "")
    several = plan.get("axes") and (len(plan["axes"]["models"]) > 1 or plan["axes"]["protocol"] == "per_task")
    if plan["sampler"] == "grid" and several:
        trials = f"{plan['n_trials']} (grid over the axes below)"
    elif plan["sampler"] == "grid":
        axes = "" if plan["n_trials"] == len(variants) * len(plan["seeds"]) else " x hyperparameter axes"
        trials = f"{plan['n_trials']} ({len(variants)} variants x {len(plan['seeds'])} seed(s){axes}, grid)"
    else:
        budget = (
            f"{plan['searched_trials']} searched" if plan["searched_trials"] else "searched until timeout"
        )
        trials = f"{plan['fixed_trials']} fixed (baselines) + {budget} ({plan['sampler']})"
    tokens = plan["generated_tokens"]
    axes = plan.get("axes")
    lines = [
        f"study {plan['study']}: {plan['model']}" + (f" ({plan['model_setup']})" if "model_setup" in plan else ""),
        f"  variants   {len(variants)}: {shown}",
        f"  trials     {trials}",
    ]
    if several:
        n_trained = len(axes["trained_variants"])
        lines += [
            f"  axes       {len(axes['models'])} model(s) x {len(axes['train_tasks'])} training task(s) x "
            f"{n_trained} trained variant(s) x {len(axes['seeds'])} seed(s) = {axes['trained_trials']} "
            f"trained trials (x grid axes, if any) + {axes['base_trials']} base evaluation(s)",
            f"  models     {', '.join(axes['models'])}",
            f"  protocol   {axes['protocol']}: "
            + "; ".join(f"{t} -> {', '.join(b)}" for t, b in axes["cells"].items()),
        ]
    lines += [
        f"  train      {', '.join(plan['train_benchmarks']) or '-'} "
        f"({plan['train_examples_per_variant']} examples per variant"
        + (", over all task models)" if several and plan["axes"]["protocol"] == "per_task" else ")"),
        f"  evaluate   {', '.join(plan['eval_benchmarks'])} ({plan['eval_examples_per_trial']} examples "
        + (
            "over all cells; a trained trial scores its own cell)"
            if several and plan["axes"]["protocol"] == "per_task"
            else "per trial)"
        ),
        f"  seeds      {', '.join(map(str, plan['seeds']))}",
        f"  objectives {', '.join(plan['objectives'])}",
    ]
    if plan["search_space"]:
        lines.append(f"  searching  {', '.join(plan['search_space'])}")
    lines += [
        f"  generated tokens ~{tokens['estimate']:,} (at most {tokens['upper_bound']:,})",
        f"  GPU hours (7B model) ~{plan['gpu_hours_7b']:,}  [{plan['assumptions']}]",
        *format_sizing(plan),
        "  GPU hours per model  "
        + ", ".join(f"{m} ~{h:,}" for m, h in plan.get("gpu_hours_per_model", {}).items())
        + "  [7B figures scaled by the parameter count in the model's name]",
        "  GPU hours per generation engine (harness/plan.py says where each rate comes from): "
        + "; ".join(
            f"{e} ~{h:,} ({plan['engine_rates'][e]})" for e, h in plan["gpu_hours_7b_by_engine"].items()
        ),
        f"  output     {plan['output_dir']}  (optuna {plan['storage']}; mlflow {plan['tracking_uri']})",
    ]
    return "\n".join(lines)
