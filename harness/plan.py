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
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from harness.errors import SpecError
from harness.spec import (
    CODE_BENCHMARKS,
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
    "point_variant",
    "search_candidates",
    "suggest_point",
]


@dataclass
class TrialPoint:
    """One trial's work: a variant (None for the untrained base model), its training config and seed.

    ``params`` is flat for logging: ``comp.<name>`` (bool) for every component, ``method``, and every
    hyperparameter that shapes this point (``agreement.gamma``, ``training.learning_rate`` ...).
    ``grid`` holds the values a grid axis chose (part of :func:`point_key`).
    """

    name: str
    family: str  # "base" | "baseline" | "unisd"
    components: tuple[str, ...]
    seed: int
    variant: VariantConfig | None
    training: TrainingConfig
    params: dict[str, Any]
    grid: dict[str, Any] = field(default_factory=dict)


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


def _preset(name: str) -> VariantConfig:
    from unisd_components.presets import PRESETS  # lazily: validation must not need the training stack

    variant = PRESETS[name]
    if variant.enabled_components() != PRESET_COMPONENTS[name]:
        raise SpecError(
            f"preset {name}: unisd_components enables {variant.enabled_components()}, "
            f"harness.spec expects {PRESET_COMPONENTS[name]}: update harness.spec.PRESET_COMPONENTS"
        )
    return variant


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
        preset = _preset(kind.preset) if kind.preset else None
        for key in ("alpha", "kl_to_base_beta"):
            defaults[key] = VariantConfig.model_fields[key].default
            use_preset = preset is not None and key not in method.model_fields_set
            raw[key] = getattr(preset, key) if use_preset else getattr(method, key)
        for name in kind.components:
            config_cls = COMPONENT_CONFIGS[name]
            section = getattr(method, name)
            if preset is not None:
                values = getattr(preset, name).model_dump()
                values.update(section_values(section, only_set=True))
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
            from unisd_components.presets import training_for_preset

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

    Order: baselines, subsets (by size), presets; within each, grid combinations, then seeds.
    """
    searching = spec.search.sampler != "grid"
    points: list[TrialPoint] = []
    for kind in _kinds(spec):
        if searching and kind.name not in spec.method.baselines:
            continue
        for values, grid in _expand(kind, spec, fixed=searching):
            for seed in spec.seeds:
                points.append(_build(kind, values, seed, grid))
    return points


def check_ema_syncs(spec: StudySpec) -> None:
    """Refuse an EMA sync period longer than the optimizer steps a variant will take (issue 11 item 5):
    its teacher would never move and the variant would train as the one without EMA. The step count
    needs the training set's size, which the plan knows and the spec's validation does not: ``harness
    validate`` and ``harness run`` call it (the trainer refuses the same at its first step)."""
    from harness.trial import _planned_steps

    n_examples = _train_examples(spec)
    searching = spec.search.sampler != "grid"
    for kind in _kinds(spec):
        if "ema" not in kind.components:
            continue
        for values, _ in _expand(kind, spec, fixed=searching):
            point = _build(kind, values, spec.seeds[0], {})
            sync = _raw_params(kind, spec)[0]["ema.sync_steps"] if searching else values["ema.sync_steps"]
            if isinstance(sync, IntSpace):
                largest = sync.high
            elif isinstance(sync, ChoiceSpace):
                largest = max(int(c) for c in sync.choices)  # type: ignore[arg-type]
            else:
                largest = sync
            steps = _planned_steps(point.training, n_examples)
            if largest > steps:
                tr = point.training
                where = f"{spec.source}: " if spec.source else ""
                raise SpecError(
                    f"{where}method.ema.sync_steps: {largest} is more than the {steps} optimizer steps "
                    f"{kind.name} takes ({n_examples} examples, batch {tr.batch_size} x grad_accum "
                    f"{tr.grad_accum}, {tr.epochs} epoch(s)): its EMA teacher would never sync; lower it"
                )


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
    return _build(kind, values, seed, {})


def point_key(point: TrialPoint) -> str:
    """A stable id of a grid point: variant, seed and the grid axes' values (``unisd[ema]/seed=0``)."""
    key = f"{point.name}/seed={point.seed}"
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

# Approximate split sizes (hub versions) for estimates when the spec takes a whole split.
_TRAIN_SIZES = {"scienceqa": 12726, "cos_e": 9741, "mbpp": 120, "toolalpaca": 3938, "gsm8k": 7473}
_EVAL_SIZES = {
    "scienceqa": 4241,
    "gpqa": 198,
    "mbpp": 257,
    "humaneval": 164,
    "cos_e": 1221,
    "toolalpaca": 114,
    "gsm8k": 1319,
}
# Throughput assumptions for a 7B model in bf16 on one 80 GB H100-class GPU, HF transformers (no vLLM):
# batched `generate` decodes ~1,500 tokens/s over a batch of 16-32; a forward+backward pass (LoRA, gradient
# checkpointing) processes ~6,000 tokens/s; a gradient-free forward ~18,000 tokens/s. Average prompt length
# is taken as 300 tokens, average generated length as 60% of the cap (samples stop at EOS).
GEN_TOKENS_PER_S = 1500.0
TRAIN_TOKENS_PER_S = 6000.0
FORWARD_TOKENS_PER_S = 18000.0
MEAN_PROMPT_TOKENS = 300
MEAN_FILL = 0.6


def _train_examples(spec: StudySpec) -> int:
    size = spec.data.train_size
    return sum(min(size, _TRAIN_SIZES[b]) if size else _TRAIN_SIZES[b] for b in spec.data.train)


def _eval_examples(spec: StudySpec) -> int:
    limit = spec.evaluation.limit
    return sum(min(limit, _EVAL_SIZES[b]) if limit else _EVAL_SIZES[b] for b in spec.evaluation.benchmarks)


def _eval_generations(spec: StudySpec) -> int:
    """Prompts whose answers are generated: all under generative scoring, code/tool ones under loglikelihood."""
    ev = spec.evaluation
    benches = ev.benchmarks
    if ev.scoring == "loglikelihood":
        benches = [b for b in benches if b in CODE_BENCHMARKS or b == "toolalpaca"]
    return sum(min(ev.limit, _EVAL_SIZES[b]) if ev.limit else _EVAL_SIZES[b] for b in benches)


def _trial_cost(point: TrialPoint, spec: StudySpec) -> tuple[float, float, float]:
    """(upper bound of generated tokens, estimated generated tokens, estimated GPU seconds) of one trial."""
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
    seconds = gen_tokens / GEN_TOKENS_PER_S + eval_forward / FORWARD_TOKENS_PER_S
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
    # Student forward+backward once; teacher forwards: the demonstration teacher (+ the richer context),
    # K agreement contexts, the negative context. Negatives are generated once per study (not counted here).
    teacher_forwards = 1.0 if variant.method != "sft" else 0.0
    if variant.agreement is not None:
        teacher_forwards += variant.agreement.k
    if variant.contrastive is not None:
        teacher_forwards += 1
    seconds += on_policy * prompts * completion / GEN_TOKENS_PER_S
    seconds += prompts * seq / TRAIN_TOKENS_PER_S + prompts * seq * teacher_forwards / FORWARD_TOKENS_PER_S
    return upper, gen_tokens, seconds


def describe_plan(spec: StudySpec) -> dict[str, Any]:
    """What a study will run and roughly what it costs (``harness run --dry-run``).

    ``generated_tokens`` counts sampled tokens (training on-policy samples + evaluation answers); the
    ``upper_bound`` assumes every sample runs to its cap. ``gpu_hours_7b`` applies the throughput
    assumptions stated above this function to a 7B model on one GPU, whatever ``model.ref`` is.
    """
    fixed = grid_points(spec)
    searching = spec.search.sampler != "grid"
    costs = [_trial_cost(p, spec) for p in fixed]
    n_search = spec.search.n_trials or 0
    if searching and n_search:
        # A searched trial costs about what the first candidate at its defaults costs.
        kind = next(k for k in _kinds(spec) if k.name not in spec.method.baselines)
        values, _ = next(_expand(kind, spec, fixed=True))
        costs += [_trial_cost(_build(kind, values, spec.seeds[0], {}), spec)] * n_search
    shared_gen = 0.0
    if spec.evaluation.retention:
        shared_gen += _eval_examples(spec) * spec.evaluation.max_gen_tokens  # base completions, once
    uses_contrastive = any("contrastive" in k.components for k in _kinds(spec))
    if uses_contrastive:
        shared_gen += _train_examples(spec) * spec.training.max_completion_tokens  # negatives, once
    variants = list(dict.fromkeys(p.name for p in fixed))
    if searching:
        variants += [n for n in search_candidates(spec) if n not in variants]
    upper = sum(c[0] for c in costs) + shared_gen
    estimate = sum(c[1] for c in costs) + MEAN_FILL * shared_gen
    seconds = sum(c[2] for c in costs) + MEAN_FILL * shared_gen / GEN_TOKENS_PER_S
    return {
        "study": spec.name,
        "model": spec.model.ref,
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
        "assumptions": (
            f"7B bf16 on one H100-class GPU: generation {GEN_TOKENS_PER_S:.0f} tok/s, training "
            f"{TRAIN_TOKENS_PER_S:.0f} tok/s, scoring {FORWARD_TOKENS_PER_S:.0f} tok/s; samples fill "
            f"{MEAN_FILL:.0%} of their cap; prompts ~{MEAN_PROMPT_TOKENS} tokens"
        ),
        "output_dir": str(spec.output_path),
        "storage": spec.storage_url,
        "tracking_uri": spec.tracking_uri,
    }


def format_plan(plan: Mapping[str, Any]) -> str:
    """:func:`describe_plan`'s dict as the few lines ``--dry-run`` prints."""
    variants = plan["variants"]
    shown = ", ".join(variants[:10]) + (f", ... ({len(variants) - 10} more)" if len(variants) > 10 else "")
    if plan["sampler"] == "grid":
        axes = "" if plan["n_trials"] == len(variants) * len(plan["seeds"]) else " x hyperparameter axes"
        trials = f"{plan['n_trials']} ({len(variants)} variants x {len(plan['seeds'])} seed(s){axes}, grid)"
    else:
        budget = (
            f"{plan['searched_trials']} searched" if plan["searched_trials"] else "searched until timeout"
        )
        trials = f"{plan['fixed_trials']} fixed (baselines) + {budget} ({plan['sampler']})"
    tokens = plan["generated_tokens"]
    lines = [
        f"study {plan['study']}: {plan['model']}",
        f"  variants   {len(variants)}: {shown}",
        f"  trials     {trials}",
        f"  train      {', '.join(plan['train_benchmarks']) or '-'} "
        f"({plan['train_examples_per_variant']} examples per variant)",
        f"  evaluate   {', '.join(plan['eval_benchmarks'])} ({plan['eval_examples_per_trial']} examples per trial)",
        f"  seeds      {', '.join(map(str, plan['seeds']))}",
        f"  objectives {', '.join(plan['objectives'])}",
    ]
    if plan["search_space"]:
        lines.append(f"  searching  {', '.join(plan['search_space'])}")
    lines += [
        f"  generated tokens ~{tokens['estimate']:,} (at most {tokens['upper_bound']:,})",
        f"  GPU hours (7B model) ~{plan['gpu_hours_7b']:,}  [{plan['assumptions']}]",
        f"  output     {plan['output_dir']}  (optuna {plan['storage']}; mlflow {plan['tracking_uri']})",
    ]
    return "\n".join(lines)
