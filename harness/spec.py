"""The study spec: one YAML file describes a whole study; this module validates it.

Why a schema of its own: a study is a week of GPU time, so a typo must fail in a second with one line
that says where (file and YAML line), what (the field path) and why, never a traceback or a silently
ignored key. Every section forbids unknown keys and suggests the closest valid name.

The component sections mirror the mechanisms' configs field by field (they are generated from the
mechanism registry, so a mechanism or a hyperparameter added there is valid here, and the benchmark
names come from ``harness.data``'s records), and every hyperparameter may be a fixed value or a
search space::

    method:
      subsets: all                       # 2^5 = 32 subsets of `components`, the empty one is plain SDFT
      agreement:
        gamma: {type: float, low: 1.0e-3, high: 10, log: true}
        k: {type: int, low: 2, high: 5}
        strategy: {choices: [random, retrieval]}

Load with :func:`load_spec`; ``harness schema`` prints :func:`spec_json_schema` for editor completion.
Strings may use ``${VAR}`` and ``${VAR:-default}``; ``base: other.yaml`` inherits a spec (deep merge,
lists and scalars replaced).
"""

from __future__ import annotations

import difflib
import functools
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from harness._yaml import LocationMap, load_yaml_with_lines
from harness.data.registry import freeze_benchmarks
from harness.errors import SpecError
from unisd_components.config import COMPONENT_NAMES, GKDConfig, TrainingConfig, VariantConfig
from unisd_components.presets import PRESETS
from unisd_components.registry import mechanisms
from unisd_components.strict_numbers import bool_problem, refuse_bool_for_numbers

__all__ = [
    "BASELINES",
    "BENCHMARKS",
    "COMPONENT_CONFIGS",
    "COMPONENT_SECTIONS",
    "EVAL_ONLY_BENCHMARKS",
    "PRESET_COMPONENTS",
    "ChoiceSpace",
    "DesignSubsets",
    "FloatSpace",
    "IntSpace",
    "StudySpec",
    "is_space",
    "fixed_spec_data",
    "load_spec",
    "spec_json_schema",
]

# Every name list below derives from a registry: benchmarks from harness.data's records, components from
# unisd_components.registry, presets from unisd_components.presets (none of them imports torch).
_BENCHMARK_RECORDS = freeze_benchmarks("harness.spec (the benchmark literal)")
BENCHMARKS: tuple[str, ...] = tuple(_BENCHMARK_RECORDS)
EVAL_ONLY_BENCHMARKS: frozenset[str] = frozenset(n for n, b in _BENCHMARK_RECORDS.items() if not b.trainable)
CODE_BENCHMARKS: frozenset[str] = frozenset(n for n, b in _BENCHMARK_RECORDS.items() if b.kind == "code")
# The transfer cells each benchmark record declares (the paper's: scienceqa -> gpqa, mbpp -> humaneval).
DEFAULT_TRANSFER: dict[str, tuple[str, ...]] = {n: b.transfer for n, b in _BENCHMARK_RECORDS.items() if b.transfer}
BASELINES: tuple[str, ...] = ("base", "sft", "sdft", "gkd")
COMPONENT_CONFIGS: dict[str, type[BaseModel]] = {name: m.config for name, m in mechanisms().items()}
# The presets of unisd_components.presets and the components they enable (unisd-method.md section 2).
PRESET_COMPONENTS: dict[str, tuple[str, ...]] = {name: v.enabled_components() for name, v in PRESETS.items()}
METRICS_GLOBAL: tuple[str, ...] = ("mean.acc", "ppl_fit", "ppl_ret", "ret_jsd", "ppl_ret_reverse")

Benchmark = Literal[BENCHMARKS]  # type: ignore[valid-type]
ComponentName = Literal[COMPONENT_NAMES]  # type: ignore[valid-type]
BaselineName = Literal["base", "sft", "sdft", "gkd"]
PresetName = Literal[tuple(PRESETS)]  # type: ignore[valid-type]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")
    # `training.max_steps: true` is not 1: no boolean in an int or float field (see strict_numbers)
    _no_bool_numbers = field_validator("*", mode="before")(refuse_bool_for_numbers)


class _FieldProblem(ValueError):
    """A cross-field inconsistency, pointing at the field (path relative to the model) to blame."""

    def __init__(self, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.path = path


# --------------------------------------------------------------------------------------------------
# Search spaces


class FloatSpace(_Strict):
    """A continuous range, sampled by TPE/random (``trial.suggest_float``)."""

    type: Literal["float"]
    low: float
    high: float
    log: bool = False
    step: float | None = Field(None, gt=0)
    default: float | None = Field(
        None, description="value for fixed points (baselines); else the config default"
    )

    @model_validator(mode="after")
    def _check(self) -> FloatSpace:
        if not self.low < self.high:
            raise _FieldProblem(("high",), f"must be > low ({self.low}) (got {self.high})")
        if self.log and self.low <= 0:
            raise _FieldProblem(("low",), f"must be > 0 with log: true (got {self.low})")
        if self.log and self.step is not None:
            raise _FieldProblem(("step",), "cannot be combined with log: true")
        return self


class IntSpace(_Strict):
    """An integer range (``trial.suggest_int``); a grid enumerates it when ``log`` is false."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, ge=1)
    log: bool = False
    default: int | None = Field(
        None, description="value for fixed points (baselines); else the config default"
    )

    @model_validator(mode="after")
    def _check(self) -> IntSpace:
        if not self.low < self.high:
            raise _FieldProblem(("high",), f"must be > low ({self.low}) (got {self.high})")
        if self.log and self.low <= 0:
            raise _FieldProblem(("low",), f"must be > 0 with log: true (got {self.low})")
        if self.log and self.step != 1:
            raise _FieldProblem(("step",), "must be 1 with log: true")
        return self

    def values(self) -> list[int]:
        return list(range(self.low, self.high + 1, self.step))


Scalar = str | int | float | bool | None


class ChoiceSpace(_Strict):
    """A categorical choice (``trial.suggest_categorical``); a grid runs every value."""

    type: Literal["categorical"] = "categorical"
    choices: list[Scalar] = Field(min_length=1)
    default: Scalar = Field(None, description="value for fixed points (baselines); else the first choice")

    @field_validator("choices")
    @classmethod
    def _unique(cls, choices: list[Scalar]) -> list[Scalar]:
        seen: list[Scalar] = []
        for value in choices:
            if any(value == s and type(value) is type(s) for s in seen):
                raise ValueError(f"choice {value!r} listed twice")
            seen.append(value)
        return choices


Space = FloatSpace | IntSpace | ChoiceSpace
_TAG_VALUE, _TAG_FLOAT, _TAG_INT, _TAG_CHOICES = "<value>", "<float range>", "<int range>", "<choices>"


def is_space(value: Any) -> bool:
    return isinstance(value, FloatSpace | IntSpace | ChoiceSpace)


def _space_tag(value: Any) -> str | None:
    if isinstance(value, FloatSpace):
        return _TAG_FLOAT
    if isinstance(value, IntSpace):
        return _TAG_INT
    if isinstance(value, ChoiceSpace):
        return _TAG_CHOICES
    if not isinstance(value, dict):
        return _TAG_VALUE
    if "choices" in value:
        return _TAG_CHOICES
    return {"float": _TAG_FLOAT, "int": _TAG_INT}.get(value.get("type"))  # None: reported as bad space


def _plain(annotation: Any) -> Any:
    """``int | None`` -> ``int``; ``float`` -> ``float``; a Literal or bool stays as it is."""
    if typing.get_origin(annotation) in (Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        return members[0] if len(members) == 1 else annotation
    return annotation


def _check_against_field(adapter: TypeAdapter, value: Any, annotation: Any = None) -> Any:
    """A search space's bounds and choices must themselves be valid values of the field."""
    if isinstance(value, FloatSpace | IntSpace):
        probes = [("low", value.low), ("high", value.high)]
    elif isinstance(value, ChoiceSpace):
        probes = [(f"choices[{i}]", c) for i, c in enumerate(value.choices)]
    else:
        return value
    if value.default is not None:
        probes.append(("default", value.default))
    for label, probe in probes:
        problem = bool_problem(annotation, probe)
        if problem:
            raise ValueError(f"search space {label}: {problem}")
        try:
            adapter.validate_python(probe)
        except ValidationError as err:
            raise ValueError(f"search space {label}: {_describe_error(err.errors()[0])}") from None
    return value


def _hyperparameter(field: Any) -> tuple[Any, Any]:
    """The spec type of one config field: its own constrained type, or a search space over it."""
    value_type = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    plain = _plain(field.annotation)
    members: list[Any] = [Annotated[value_type, Tag(_TAG_VALUE)], Annotated[ChoiceSpace, Tag(_TAG_CHOICES)]]
    if plain is float:
        members.append(Annotated[FloatSpace, Tag(_TAG_FLOAT)])
    elif plain is int:
        members.append(Annotated[IntSpace, Tag(_TAG_INT)])
    checker = functools.partial(_check_against_field, TypeAdapter(value_type), annotation=value_type)
    spec_type = Annotated[Union[tuple(members)], Discriminator(_space_tag), AfterValidator(checker)]  # noqa: UP007
    return spec_type, Field(field.default, description=field.description)


def _section_model(config: type[BaseModel], name: str, skip: tuple[str, ...] = ()) -> type[BaseModel]:
    fields = {key: _hyperparameter(f) for key, f in config.model_fields.items() if key not in skip}
    doc = (config.__doc__ or "").strip().splitlines()[0] if config.__doc__ else ""
    return create_model(
        name,
        __base__=_Strict,
        __doc__=f"{doc} Every field: a value or a search space.",
        **fields,
    )


# One section per registered mechanism (AgreementSpec, EMASpec ...), named after its config class.
COMPONENT_SECTIONS: dict[str, type[BaseModel]] = {
    name: _section_model(config, config.__name__.removesuffix("Config") + "Spec")
    for name, config in COMPONENT_CONFIGS.items()
}
globals().update({section.__name__: section for section in COMPONENT_SECTIONS.values()})  # for pickle
GKDSpec = _section_model(GKDConfig, "GKDSpec")
TrainingSpec = _section_model(TrainingConfig, "TrainingSpec", skip=("seed",))
_ALPHA_TYPE, _ALPHA_FIELD = _hyperparameter(VariantConfig.model_fields["alpha"])
_KL_TYPE, _KL_FIELD = _hyperparameter(VariantConfig.model_fields["kl_to_base_beta"])


def section_values(section: BaseModel | None, *, only_set: bool = False) -> dict[str, Any]:
    """The fields of a component/training section (values or spaces), all or only those the user wrote."""
    if section is None:
        return {}
    names = section.model_fields_set if only_set else type(section).model_fields
    return {name: getattr(section, name) for name in type(section).model_fields if name in names}


# --------------------------------------------------------------------------------------------------
# Sections


class LoRASpec(_Strict):
    """LoRA adapters (peft). Off: full fine-tuning of every weight."""

    enabled: bool = False
    r: int = Field(
        16, ge=1, description="adapter rank; CPU-sized default 16, the method contract's 64 for large models"
    )
    alpha: float = Field(32.0, gt=0, description="scale alpha/r; CPU-sized default 32 (GPU studies: 2r)")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="module names to adapt (attention and MLP projections by default)",
    )


class ModelSpec(_Strict):
    """The model every variant starts from (also the frozen teacher and the retention reference).

    A study's ``model`` may be a list of these (the model axis): each trains every variant of its own,
    and ``name`` labels it in trial coordinates, caches and report tables.
    """

    ref: str = Field(
        min_length=1,
        description="HF hub id, local directory, bundled:smollm2-135m-instruct, tiny-random:llama or "
        "tiny-random:qwen2",
    )
    name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="short name for tables and paths; None: the last part of ref",
    )
    batch_size: int | None = Field(
        None, ge=1, description="per-device training batch for this model; None: training.batch_size"
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str | None = Field(None, description="cpu, cuda, cuda:1 ...; None: cuda when available")
    lora: LoRASpec = Field(default_factory=LoRASpec)

    @field_validator("ref")
    @classmethod
    def _known_scheme(cls, ref: str) -> str:
        known = {"bundled": ("smollm2-135m-instruct",), "tiny-random": ("llama", "qwen2")}
        scheme, sep, rest = ref.partition(":")
        if sep and scheme in known and rest not in known[scheme]:
            valid = ", ".join(f"{scheme}:{name}" for name in known[scheme])
            raise ValueError(f"unknown {scheme} model {ref!r}; valid: {valid}")
        return ref

    @field_validator("device")
    @classmethod
    def _device(cls, device: str | None) -> str | None:
        if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
            raise ValueError(f"must be cpu, cuda, cuda:N or mps (got {device!r})")
        return device

    @property
    def label(self) -> str:
        """The model's short name: ``name``, else the last part of ``ref`` (``Qwen2.5-7B-Instruct``)."""
        if self.name:
            return self.name
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.ref.rstrip("/").rsplit("/", 1)[-1]).strip("-") or "model"

    @model_validator(mode="after")
    def _no_half_on_cpu(self) -> ModelSpec:
        if self.device == "cpu" and self.dtype in ("bfloat16", "float16"):
            raise _FieldProblem(
                ("dtype",), f"{self.dtype} on cpu is slow and unsupported; use auto or float32"
            )
        return self


class DataSpec(_Strict):
    """Training data. Evaluation benchmarks live in ``evaluation``."""

    train: list[Benchmark] = Field(default_factory=list, description="training benchmarks")
    train_size: int | None = Field(None, ge=1, description="examples per training benchmark; None: all")
    dev_size: int | None = Field(
        None, ge=1, description="validation examples per benchmark for pruning (intermediate metric)"
    )
    split_seed: int = Field(0, description="seed of the deterministic subsampling")
    data_dir: str | None = Field(
        None, description="local benchmark files; None: $UNISD_DATA_DIR, else the hub"
    )
    protocol: Literal["per_task", "pooled"] = Field(
        "pooled",
        description="per_task: one model per training benchmark, scored on it and its transfer benchmarks "
        "(the paper's protocol); pooled: one model on all training benchmarks together",
    )
    transfer: dict[Benchmark, list[Benchmark]] = Field(
        default_factory=lambda: {k: list(v) for k, v in DEFAULT_TRANSFER.items()},
        description="per_task: the benchmarks a training task's model is also scored on (transfer cells)",
    )

    @field_validator("train")
    @classmethod
    def _trainable(cls, names: list[str]) -> list[str]:
        for i, name in enumerate(names):
            if name in EVAL_ONLY_BENCHMARKS:
                raise _FieldProblem((i,), f"{name} is evaluation-only (no train split); use it in evaluation")
        _no_repeats(names)
        return names

    @field_validator("data_dir")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None


def _no_repeats(items: list[Any]) -> None:
    for i, item in enumerate(items):
        if item in items[:i]:
            raise _FieldProblem((i,), f"{item!r} listed twice")


class DesignSubsets(_Strict):
    """``subsets: {design: fractional, resolution: 5}``: a regular 2^(k−p) fraction of the subsets of
    ``method.components`` (harness.design: the smallest one of that resolution, containing the empty
    subset, i.e. plain SDFT); ``design: full`` is the same as ``all``."""

    design: Literal["fractional", "full"]
    resolution: int = Field(5, ge=3, le=5, description="3, 4 or 5: the fraction's resolution")


def _split_subsets(value: Any) -> Any:
    if isinstance(value, dict | DesignSubsets):
        return value
    if isinstance(value, str):
        if value != "all":
            raise ValueError(
                f"must be 'all', a list of subsets like [[ema], agreement+ema, []] or {{design: fractional, resolution: 5}}"
                f" (got {value!r})"
            )
        return value
    if isinstance(value, list):
        return [
            [p.strip() for p in item.split("+") if p.strip()] if isinstance(item, str) else item
            for item in value
        ]
    return value


SubsetsType = Annotated[
    Union[  # noqa: UP007
        Annotated[Literal["all"], Tag("<all>")],
        Annotated[list[list[ComponentName]], Tag("<list>")],
        Annotated[DesignSubsets, Tag("<design>")],
    ],
    Discriminator(
        lambda v: "<all>" if isinstance(v, str) else "<design>" if isinstance(v, dict | DesignSubsets) else "<list>"
    ),
    BeforeValidator(_split_subsets),
]


class _PresetOverrideBase(_Strict):
    """Changes to one named preset (``method.preset_overrides.<preset>``); unset fields keep its values.

    Why a section of its own: a preset is a recipe with its own values (unisd-method.md section 2). The
    component sections of ``method`` configure the factorial subsets and never reach a preset, so a
    study cannot silently turn ``unisd_star_paper`` into another subset under the paper's name.
    """

    alpha: _ALPHA_TYPE = _ALPHA_FIELD  # type: ignore[valid-type]
    kl_to_base_beta: _KL_TYPE = _KL_FIELD  # type: ignore[valid-type]


# One optional section per registered mechanism, as in MethodSpec.
PresetOverrideSpec = create_model(
    "PresetOverrideSpec",
    __base__=_PresetOverrideBase,
    __module__=__name__,
    __doc__=_PresetOverrideBase.__doc__,
    **{name: (section | None, None) for name, section in COMPONENT_SECTIONS.items()},
)


class _MethodSpecBase(_Strict):
    """Which variants to train: baselines, component subsets, presets, and their hyperparameters.

    The component sections (``agreement``, ``ema`` ...) and ``alpha``/``kl_to_base_beta`` apply to the
    subsets; a preset keeps its own values unless ``preset_overrides.<preset>`` changes them.
    """

    baselines: list[BaselineName] = Field(default_factory=list, description="base, sft, sdft, gkd")
    components: list[ComponentName] = Field(
        default_factory=lambda: list(COMPONENT_NAMES), description="the components `subsets: all` combines"
    )
    subsets: SubsetsType = Field(
        default_factory=list,
        description="'all' (every subset of `components`, the empty one is plain SDFT), a list of subsets,"
        " each a list of component names or a string 'agreement+ema', or {design: fractional, resolution: 5}"
        " (a regular fraction of the subsets of `components`)",
    )
    presets: list[PresetName] = Field(default_factory=list, description="named recipes: unisd_star ...")
    preset_overrides: dict[PresetName, PresetOverrideSpec] = Field(
        default_factory=dict,
        description="per preset: values (or search spaces) replacing the preset's own; the component "
        "sections above never apply to presets",
    )
    alpha: _ALPHA_TYPE = _ALPHA_FIELD  # type: ignore[valid-type]
    kl_to_base_beta: _KL_TYPE = _KL_FIELD  # type: ignore[valid-type]
    # then one section per mechanism and gkd: see MethodSpec below

    @field_validator("baselines", "presets", "components")
    @classmethod
    def _unique(cls, items: list[str]) -> list[str]:
        _no_repeats(items)
        return items

    def subset_list(self) -> list[tuple[str, ...]]:
        """The subsets to run, each in canonical component order, without repeats."""
        if isinstance(self.subsets, DesignSubsets):
            from harness.design import fractional_design, full_design

            pool = [c for c in COMPONENT_NAMES if c in self.components]
            full = self.subsets.design == "full"
            design = full_design(pool) if full else fractional_design(pool, self.subsets.resolution)
            runs = [tuple(c for c, on in zip(pool, run, strict=True) if on) for run in design.runs]
            return sorted(runs, key=len)
        if self.subsets == "all":
            pool = [c for c in COMPONENT_NAMES if c in self.components]
            subsets = [
                tuple(c for j, c in enumerate(pool) if mask >> j & 1) for mask in range(2 ** len(pool))
            ]
            return sorted(subsets, key=len)
        return [tuple(c for c in COMPONENT_NAMES if c in subset) for subset in self.subsets]

    def enabled_anywhere(self) -> set[str]:
        names = {c for subset in self.subset_list() for c in subset}
        for preset in self.presets:
            names.update(PRESET_COMPONENTS[preset])
        return names

    @model_validator(mode="after")
    def _consistent(self) -> _MethodSpecBase:
        if isinstance(self.subsets, list):
            seen: list[tuple[str, ...]] = []
            for i, subset in enumerate(self.subsets):
                for j, name in enumerate(subset):
                    if name in subset[:j]:
                        raise _FieldProblem(("subsets", i, j), f"component {name!r} twice in one subset")
                    if "components" in self.model_fields_set and name not in self.components:
                        raise _FieldProblem(
                            ("subsets", i, j), f"{name!r} is not in method.components {self.components}"
                        )
                canon = tuple(c for c in COMPONENT_NAMES if c in subset)
                if canon in seen:
                    raise _FieldProblem(("subsets", i), f"subset {'+'.join(canon) or '[]'} listed twice")
                seen.append(canon)
        if not (self.baselines or self.presets or self.subset_list()):
            raise _FieldProblem((), "nothing to run: set baselines, subsets or presets")
        in_subsets = {c for subset in self.subset_list() for c in subset}
        for name in COMPONENT_NAMES:
            if getattr(self, name) is not None and name not in in_subsets:
                hint = "add it to method.subsets"
                if name in self.enabled_anywhere():
                    presets = [p for p in self.presets if name in PRESET_COMPONENTS[p]]
                    hint = (
                        f"component sections configure subsets only; to change preset {presets[0]} "
                        f"write method.preset_overrides.{presets[0]}.{name}"
                    )
                raise _FieldProblem((name,), f"configured but no subset enables it ({hint})")
        for preset, override in self.preset_overrides.items():
            if preset not in self.presets:
                raise _FieldProblem(("preset_overrides", preset), f"{preset} is not in method.presets")
            for name in COMPONENT_NAMES:
                if getattr(override, name) is not None and name not in PRESET_COMPONENTS[preset]:
                    raise _FieldProblem(
                        ("preset_overrides", preset, name),
                        f"{preset} does not enable {name} (it enables {', '.join(PRESET_COMPONENTS[preset])})",
                    )
        if self.gkd is not None and "gkd" not in self.baselines:
            raise _FieldProblem(
                ("gkd",), "gkd parameters without the gkd baseline (add gkd to method.baselines)"
            )
        return self


# The component sections derive from the mechanism registry (field order: the static fields above, the
# mechanisms in canonical order, then gkd).
MethodSpec = create_model(
    "MethodSpec",
    __base__=_MethodSpecBase,
    __module__=__name__,
    __doc__=_MethodSpecBase.__doc__,
    **{name: (section | None, None) for name, section in COMPONENT_SECTIONS.items()},
    gkd=(GKDSpec | None, Field(None, description="GKD baseline: beta (JSD interpolation), lmbda")),
)


class EvaluationSpec(_Strict):
    """How every variant (and the base model) is scored; metric names as in harness.evaluation."""

    benchmarks: list[Benchmark] = Field(min_length=1)
    split: Literal["test", "validation"] = "test"
    limit: int | None = Field(None, ge=1, description="examples per benchmark; None: all")
    batch_size: int = Field(8, ge=1)
    max_gen_tokens: int = Field(256, ge=1)
    scoring: Literal["generative", "loglikelihood"] = "generative"
    ppl_fit: bool = True
    retention: bool = True

    @field_validator("benchmarks")
    @classmethod
    def _unique(cls, items: list[str]) -> list[str]:
        _no_repeats(items)
        return items


class GenerationSpec(_Strict):
    """Which engine samples training completions and generates evaluation answers (harness.generation_engine)."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto: vLLM when installed and on CUDA, else hf (transformers generate)"
    )
    gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="vllm on CUDA: share of GPU memory for the engine (shared with training)"
    )
    kv_cache_gib: float | None = Field(
        None,
        gt=0,
        description="vllm: KV cache size in GiB; None: 1 GiB of RAM on CPU, the share above on CUDA",
    )
    max_model_len: int | None = Field(
        None, ge=16, description="vllm: longest prompt + completion; None: the model's"
    )


class ObjectiveSpec(_Strict):
    metric: str = Field(description="mean.acc, <bench>.acc, <bench>.pass_at_1, ppl_fit, ppl_ret, ret_jsd ...")
    direction: Literal["maximize", "minimize"] = "maximize"


class SearchSpec(_Strict):
    """The Optuna side: grid for ablations, TPE/random for searches."""

    sampler: Literal["grid", "tpe", "random"] = "grid"
    n_trials: int | None = Field(None, ge=1, description="tpe/random: trials to sample (baselines excluded)")
    timeout: float | None = Field(None, gt=0, description="seconds; stop sampling after this")
    pruner: Literal["none", "median", "hyperband"] = "none"
    objectives: list[ObjectiveSpec] = Field(
        default_factory=lambda: [ObjectiveSpec(metric="mean.acc", direction="maximize")], min_length=1
    )
    seed: int = Field(0, description="sampler seed")


class TrackingSpec(_Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; None: sqlite inside output_dir")
    experiment: str | None = Field(None, description="MLflow experiment; None: the study name")


def _check_models(value: Any) -> Any:
    if isinstance(value, list):
        names = [m.label for m in value]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise _FieldProblem((i, "name"), f"model name {name!r} used twice (set a distinct name)")
    return value


ModelsType = Annotated[
    Union[  # noqa: UP007
        Annotated[ModelSpec, Tag("<one>")],
        Annotated[list[ModelSpec], Tag("<list>"), Field(min_length=1)],
    ],
    Discriminator(lambda v: "<list>" if isinstance(v, list) else "<one>"),
    AfterValidator(_check_models),
]


def _may_be(value: Any, wanted: Any) -> bool:
    """A fixed value equal to ``wanted``, or a choice space that offers it."""
    if isinstance(value, ChoiceSpace):
        return any(c == wanted for c in value.choices)
    return value == wanted


def _check_nothing_inert(method: MethodSpec) -> None:
    """Refuse settings that validate and then do nothing (issue 11 item 5), one field and reason each.

    Why here, in one place: each of these made a variant train as another one while its name said
    otherwise. The EMA sync period against the planned optimizer steps needs the training set's size, so
    it is checked with the plan (``harness.plan``), not here.
    """
    variants: list[tuple[str, tuple[str, ...]]] = [
        ("unisd[" + "+".join(s) + "]", s) for s in method.subset_list() if s
    ]
    variants += [(p, PRESET_COMPONENTS[p]) for p in method.presets]
    fm = method.feature_matching
    if fm is not None and _may_be(fm.match_repr, True):
        for name, components in variants:
            dropped = [c for c in ("agreement", "clipping") if c in components]
            if "feature_matching" in components and dropped:
                raise _FieldProblem(
                    ("method", "feature_matching", "match_repr"),
                    f"drops the divergence, so {' and '.join(dropped)} in {name} would do nothing "
                    "(they weight and clip the divergence); leave them out of that variant or set false",
                )
    clip = method.clipping
    if clip is not None:
        mode_set = clip.model_fields_set
        if "cap" in mode_set and not _may_be(clip.mode, "static"):
            raise _FieldProblem(
                ("method", "clipping", "cap"),
                "only mode: static uses a fixed cap (adaptive caps at the batch's quantile); remove it",
            )
        if "quantile" in mode_set and not _may_be(clip.mode, "adaptive"):
            raise _FieldProblem(
                ("method", "clipping", "quantile"),
                "only mode: adaptive uses the quantile (static caps at clipping.cap); remove it",
            )
    agreement = method.agreement
    if agreement is not None and not _may_be(agreement.level, "token"):
        for key in ("quantile", "cap", "floor"):
            if key in agreement.model_fields_set:
                raise _FieldProblem(
                    ("method", "agreement", key),
                    "a token-level setting: level sequence weights whole sequences and ignores it",
                )
    distills = bool(variants) or "sdft" in method.baselines or any(not s for s in method.subset_list())
    if "alpha" in method.model_fields_set and not distills:
        raise _FieldProblem(
            ("method", "alpha"),
            "no variant uses it: it is the divergence of sdft and the UniSD variants (GKD's is "
            "method.gkd.beta, SFT has none)",
        )
    if "kl_to_base_beta" in method.model_fields_set and not (distills or "gkd" in method.baselines):
        raise _FieldProblem(
            ("method", "kl_to_base_beta"),
            "no variant uses it: SFT trains on gold demonstrations, not on its own samples",
        )


class StudySpec(_Strict):
    """One study: what to train, how to evaluate, how to search, where results go.

    Its axes multiply in ``harness.plan``: models (``model`` may be a list) x training tasks
    (``data.protocol: per_task``: one per training benchmark; ``pooled``: one, all together) x variants x
    seeds.
    """

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="study name (Optuna, MLflow, paths)"
    )
    description: str = ""
    model: ModelsType = Field(description="one model section, or a list of them (the model axis)")
    data: DataSpec = Field(default_factory=DataSpec)
    method: MethodSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)  # type: ignore[valid-type]
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    evaluation: EvaluationSpec
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    storage: str | None = Field(None, description="Optuna storage URL; None: sqlite inside output_dir")
    output_dir: str | None = Field(None, description="None: runs/<name>")

    _source: Path | None = PrivateAttr(None)

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        _no_repeats(seeds)
        return seeds

    # ---- resolved locations -------------------------------------------------------------------------

    @property
    def source(self) -> Path | None:
        """The YAML file this spec was loaded from (None when built in code)."""
        return self._source

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir or f"runs/{self.name}")

    @property
    def tracking_uri(self) -> str:
        return self.tracking.uri or f"sqlite:///{(self.output_path / 'mlflow.db').resolve()}"

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.output_path / 'optuna.db').resolve()}"

    def with_overrides(
        self, *, output_dir: str | Path | None = None, storage: str | None = None
    ) -> StudySpec:
        """A copy with the CLI's --output-dir / --storage applied (defaults derived from them follow)."""
        update: dict[str, Any] = {}
        if output_dir is not None:
            update["output_dir"] = str(output_dir)
        if storage is not None:
            update["storage"] = storage
        copy = self.model_copy(update=update)
        copy._source = self._source
        return copy

    @model_validator(mode="after")
    def _nothing_inert(self) -> StudySpec:
        _check_nothing_inert(self.method)
        return self

    # ---- derived facts ------------------------------------------------------------------------------

    def _check_axes(self) -> None:
        _check_axes_of(self)

    def models(self) -> list[ModelSpec]:
        """The model axis: every model section, in spec order (one for a single ``model`` mapping)."""
        return list(self.model) if isinstance(self.model, list) else [self.model]

    def train_tasks(self) -> list[str | None]:
        """The training-task axis: each training benchmark under ``per_task``; ``[None]`` (all pooled)."""
        return list(self.data.train) if self.data.protocol == "per_task" else [None]

    def cell_benchmarks(self, train_task: str | None) -> list[str]:
        """What the model trained on ``train_task`` is scored on: that task and its transfer benchmarks,
        in ``evaluation.benchmarks`` order (every benchmark when pooled, or for the base model: None)."""
        if train_task is None:
            return list(self.evaluation.benchmarks)
        mine = {train_task, *self.data.transfer.get(train_task, [])}  # type: ignore[call-overload]
        return [b for b in self.evaluation.benchmarks if b in mine]

    def spaces(self) -> dict[str, Space]:
        """Every search space of the spec by its parameter name (``agreement.gamma``, ``training.learning_rate``)."""
        out: dict[str, Space] = {}
        for key in ("alpha", "kl_to_base_beta"):
            if is_space(getattr(self.method, key)):
                out[key] = getattr(self.method, key)
        for name in (*COMPONENT_NAMES, "gkd"):
            for key, value in section_values(getattr(self.method, name)).items():
                if is_space(value):
                    out[f"{name}.{key}"] = value
        for override in self.method.preset_overrides.values():
            for key in ("alpha", "kl_to_base_beta"):
                if key in override.model_fields_set and is_space(getattr(override, key)):
                    out.setdefault(key, getattr(override, key))
            for name in COMPONENT_NAMES:
                for key, value in section_values(getattr(override, name)).items():
                    if is_space(value):
                        out.setdefault(f"{name}.{key}", value)
        for key, value in section_values(self.training).items():
            if is_space(value):
                out[f"training.{key}"] = value
        return out

    def metric_names(self) -> list[str]:
        names = [f"{b}.{_BENCHMARK_RECORDS[b].metric}" for b in self.evaluation.benchmarks]
        names.append("mean.acc")
        if self.evaluation.ppl_fit:
            names.append("ppl_fit")
        if self.evaluation.retention:
            names += ["ppl_ret", "ret_jsd", "ppl_ret_reverse"]
        return names

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        method, search = self.method, self.search
        trains = any(b != "base" for b in method.baselines) or method.presets or method.subset_list()
        if trains and not self.data.train:
            raise _FieldProblem(("data", "train"), "variants to train but no training benchmark")
        self._check_axes()
        valid = self.metric_names()
        for i, objective in enumerate(search.objectives):
            if objective.metric not in valid:
                close = difflib.get_close_matches(objective.metric, valid, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise _FieldProblem(
                    ("search", "objectives", i, "metric"),
                    f"unknown metric {objective.metric!r}{hint}; valid here: {', '.join(valid)}",
                )
        metrics = [o.metric for o in search.objectives]
        for i, metric in enumerate(metrics):
            if metric in metrics[:i]:
                raise _FieldProblem(
                    ("search", "objectives", i, "metric"), f"objective {metric!r} listed twice"
                )
        spaces = self.spaces()
        if search.sampler == "grid":
            for key, space in spaces.items():
                if isinstance(space, FloatSpace) or (isinstance(space, IntSpace) and space.log):
                    raise _FieldProblem(
                        _space_path(key),
                        f"a grid cannot enumerate the continuous range {space.low}..{space.high}; "
                        "use {choices: [...]} or search.sampler tpe/random",
                    )
            if search.pruner != "none":
                raise _FieldProblem(
                    ("search", "pruner"), "a grid runs every point to the end; use pruner none"
                )
        else:
            # The variants a search chooses among (harness.plan.search_candidates): the empty subset is
            # a candidate unless it is already the sdft baseline.
            subsets = [s for s in method.subset_list() if s or "sdft" not in method.baselines]
            n_candidates = len(subsets) + len(method.presets)
            if not spaces and n_candidates <= 1:
                raise _FieldProblem(
                    ("search", "sampler"),
                    f"{search.sampler} needs a search space: set a hyperparameter to {{type: float, low, high}} "
                    "or {choices: [...]}, list several subsets, or use sampler grid",
                )
            if n_candidates == 0:
                raise _FieldProblem(
                    ("method",), f"sampler {search.sampler} searches UniSD variants: add subsets or presets"
                )
            if search.n_trials is None and search.timeout is None:
                raise _FieldProblem(
                    ("search", "n_trials"), f"sampler {search.sampler} needs n_trials or timeout"
                )
        if search.pruner != "none":
            if len(search.objectives) > 1:
                raise _FieldProblem(
                    ("search", "pruner"), "Optuna cannot prune multi-objective studies; use none"
                )
            if self.data.dev_size is None:
                raise _FieldProblem(("search", "pruner"), "pruning needs a dev split: set data.dev_size")
        return self


def _check_axes_of(spec: StudySpec) -> None:
    """Per-task cells must be scoreable, and searches run one model on pooled data."""
    data, evaluation = spec.data, spec.evaluation
    if data.protocol == "per_task":
        for i, task in enumerate(data.train):
            if task not in evaluation.benchmarks:
                raise _FieldProblem(
                    ("data", "train", i),
                    f"per_task: {task} must be in evaluation.benchmarks (the in-domain cell of its model)",
                )
        reachable = {t for t in data.train} | {b for t in data.train for b in data.transfer.get(t, [])}
        for i, bench in enumerate(evaluation.benchmarks):
            if bench not in reachable:
                raise _FieldProblem(
                    ("evaluation", "benchmarks", i),
                    f"per_task: {bench} is neither a training task nor a transfer target of one "
                    "(declare it in data.transfer, e.g. {scienceqa: [gpqa]})",
                )
        for i, objective in enumerate(spec.search.objectives):
            if objective.metric not in METRICS_GLOBAL:
                raise _FieldProblem(
                    ("search", "objectives", i, "metric"),
                    f"per_task: each trial scores only its own cell; use one of {', '.join(METRICS_GLOBAL)}",
                )
    if spec.search.sampler != "grid" and (len(spec.models()) > 1 or data.protocol == "per_task"):
        raise _FieldProblem(
            ("search", "sampler"),
            f"{spec.search.sampler} searches one model on pooled data; use sampler grid for a model list "
            "or data.protocol per_task",
        )


def _space_path(key: str) -> tuple[str, ...]:
    head, _, rest = key.partition(".")
    if head == "training":
        return ("training", rest)
    return ("method", *key.split("."))


# --------------------------------------------------------------------------------------------------
# Errors: one line, file:line: field.path: reason


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return repr(value)


_TYPE_MESSAGES = {
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "bool_parsing": "must be true or false",
    "bool_type": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
}
_BOUND_OPS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _describe_error(error: dict[str, Any]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _TYPE_MESSAGES:
        return f"{_TYPE_MESSAGES[kind]} (got {_kind(value)})"
    if kind in _BOUND_OPS:
        bound = next(iter(v for k, v in ctx.items() if k in ("gt", "ge", "lt", "le")))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"must be {_BOUND_OPS[kind]} {bound} (got {value!r})"
    if kind == "literal_error":
        valid = re.findall(r"'([^']*)'", ctx.get("expected", ""))
        close = difflib.get_close_matches(str(value), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown value {value!r}{hint}; valid: {', '.join(valid)}"
    if kind == "missing":
        return "required field is missing"
    if kind in ("too_short", "too_long"):
        return f"{error['msg'].replace('List should', 'must').replace('Value should', 'must')} (got {len(value)})"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx.get('pattern')} (got {value!r})"
    if kind in ("union_tag_not_found", "union_tag_invalid"):
        return (
            "must be a value or a search space {type: float|int, low, high[, log, step]} or {choices: [...]}"
            f" fitting this field (got {_kind(value)})"
        )
    if kind == "value_error":
        return str(ctx.get("error", error["msg"])).removeprefix("Value error, ")
    return f"{error['msg']} (got {_kind(value)})"


def _members(annotation: Any) -> list[Any]:
    """The model classes and container element types reachable directly from an annotation."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _members(arg)]
    return [annotation]


def _keys_at(path: tuple[str | int, ...]) -> list[str]:
    """Valid keys of the mapping at ``path`` (for 'did you mean')."""
    current: list[Any] = [StudySpec]
    for part in path:
        nxt: list[Any] = []
        for node in current:
            if isinstance(part, int):
                if typing.get_origin(node) is list:
                    nxt += _members(typing.get_args(node)[0])
            elif isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
                nxt += _members(node.model_fields[part].annotation)
        current = [m for node in nxt for m in _members(node)]
    keys: list[str] = []
    for node in current:
        if isinstance(node, type) and issubclass(node, BaseModel):
            keys += [k for k in node.model_fields if k not in keys]
    return keys


def _format_first_error(err: ValidationError, locs: LocationMap) -> str:
    errors = err.errors(include_url=False)
    # An unknown key usually explains a "missing" one next to it (a typo): report it first.
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith("<")))
    problem = (error.get("ctx") or {}).get("error")
    if isinstance(problem, _FieldProblem):
        path = (*path, *problem.path)
        message = str(problem)
    elif error["type"] == "extra_forbidden":
        key, parent = path[-1], path[:-1]
        valid = _keys_at(parent)
        close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5)
        hint = f"did you mean {close[0]!r}?" if close else f"valid keys: {', '.join(valid)}"
        if parent == ("training",) and key == "seed":
            hint = "seeds are the top-level list `seeds: [0, 1, 2]`"
        message = f"unknown key ({hint})"
    else:
        message = _describe_error(error)
    where = locs.find(path)
    prefix = f"{where.file}:{where.line}: " if where else ""
    return f"{prefix}{_dotted(path) or '(top level)'}: {message}"


# --------------------------------------------------------------------------------------------------
# Loading


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_raw(
    path: Path, shown: str, env: dict[str, str] | None, chain: tuple[Path, ...]
) -> tuple[dict, LocationMap]:
    data, locs = load_yaml_with_lines(path, shown, env)
    if data is None:
        raise SpecError(f"{shown}:1: empty study spec: it needs at least name, model, method and evaluation")
    if not isinstance(data, dict):
        raise SpecError(
            f"{shown}:1: a study must be a mapping of sections (name, model, ...), got {_kind(data)}"
        )
    if "base" not in data:
        return data, locs
    base_ref = data.pop("base")
    where = locs.find(("base",))
    line = where.line if where else 1
    if not isinstance(base_ref, str) or not base_ref:
        raise SpecError(
            f"{shown}:{line}: base: must be the path of another study YAML (got {_kind(base_ref)})"
        )
    base_path = (path.parent / base_ref).resolve()
    if base_path in chain:
        raise SpecError(f"{shown}:{line}: base: inheritance cycle through {base_ref}")
    base_shown = str(Path(shown).parent / base_ref)
    if not base_path.is_file():
        raise SpecError(f"{shown}:{line}: base: file not found: {base_shown}")
    base_data, base_locs = _load_raw(base_path, base_shown, env, (*chain, base_path))
    merged_locs = LocationMap(default=locs.default)
    merged_locs.update(base_locs)
    merged_locs.update(locs)
    return _deep_merge(base_data, data), merged_locs


def load_spec(path: str | Path, *, env: dict[str, str] | None = None) -> StudySpec:
    """Read, interpolate, inherit and validate a study YAML.

    Raises ``SpecError`` (one line: ``file:line: field.path: reason``) for every invalid input.

    Example::

        spec = load_spec("studies/smoke.yaml")
        spec.output_path, spec.storage_url, spec.tracking_uri
    """
    shown = str(path)
    file = Path(path)
    data, locs = _load_raw(file, shown, env, (file.resolve(),))
    try:
        spec = StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_first_error(err, locs)) from None
    spec._source = file
    return spec


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of a study YAML (for editor completion: yaml-language-server, VS Code)."""
    schema = StudySpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "UniSD harness study"
    schema.setdefault("properties", {})["base"] = {
        "type": "string",
        "description": "path (relative to this file) of a study to inherit; this file's keys override it",
    }
    return schema


def dump_spec(spec: StudySpec) -> dict[str, Any]:
    """The spec as plain data (YAML/JSON-ready), spaces included, defaults filled in."""
    return spec.model_dump(mode="json")


def fixed_spec_data(spec: StudySpec, params: Mapping[str, Any], *, name: str | None = None) -> dict[str, Any]:
    """A search study pinned to one trial's parameters, as plain data ready to write as a study YAML.

    Why: a search ends with its best configuration written as a spec that a user can rerun (with more
    seeds) or hand to the ablation. ``params`` are Optuna's parameter names (``agreement.gamma``,
    ``training.learning_rate``, ``variant`` when several variants competed). The result is a grid study
    over the chosen variant (plus the study's baselines), validated before it is returned.
    """
    data = spec.model_dump(mode="json", exclude_defaults=True)
    method = data.setdefault("method", {})
    chosen = params.get("variant")
    if chosen is None:
        candidates = [s for s in spec.method.subset_list() if s or "sdft" not in spec.method.baselines]
        chosen = spec.method.presets[0] if spec.method.presets else "unisd[" + "+".join(candidates[0]) + "]"
    preset = chosen if chosen in PRESET_COMPONENTS else None
    overrides = method.pop("preset_overrides", {}) or {}
    if preset is not None:
        method["presets"], method["subsets"], enabled = [chosen], [], set(PRESET_COMPONENTS[chosen])
        # a preset takes values only through preset_overrides.<name>: the drawn ones go there
        method["preset_overrides"] = {preset: overrides.get(preset, {})}
        for component in COMPONENT_NAMES:
            method.pop(component, None)
        for key in ("alpha", "kl_to_base_beta"):
            method.pop(key, None)
    else:
        subset = chosen.removeprefix("unisd[").removesuffix("]").split("+") if chosen != "sdft" else []
        method["presets"], method["subsets"], enabled = [], [subset], set(subset)
    method.pop("components", None)
    for component in COMPONENT_NAMES:
        if component not in enabled:
            method.pop(component, None)
    for key, value in params.items():
        if key == "variant":
            continue
        *parents, leaf = _space_path(key)
        if parents[:1] == ["method"] and len(parents) > 1 and parents[1] in COMPONENT_NAMES:
            if parents[1] not in enabled:  # drawn for a component the chosen variant does not use
                continue
        if preset is not None and parents[:1] == ["method"]:
            parents = ["method", "preset_overrides", preset, *parents[1:]]
        node = data
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    data["name"] = name or f"{spec.name}_best"
    data.pop("output_dir", None)
    data.pop("storage", None)
    data.pop("tracking", None)
    data["search"] = {"sampler": "grid", "objectives": data.get("search", {}).get("objectives", [])}
    if not data["search"]["objectives"]:
        data["search"].pop("objectives")
    try:
        StudySpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"pinned spec {data['name']}: {_format_first_error(err, LocationMap())}") from None
    return data
