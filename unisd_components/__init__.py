"""UniSD: self-distillation of LLMs with five switchable mechanisms, and its baselines (SFT, SDFT, GKD).

A library: nothing here imports the harness. The public surface:

- configuration: :class:`VariantConfig` (method + enabled mechanisms), :class:`TrainingConfig`, the
  per-mechanism configs, :data:`COMPONENT_NAMES`, the named presets :data:`PRESETS`;
- training: :func:`train_variant` with :class:`TrainingExample`, :class:`TrainResult`,
  :class:`NonFiniteLossError`; :func:`apply_lora` for LoRA; :func:`init_data_parallel` for one process
  per GPU under ``accelerate launch`` (see :mod:`unisd_components.distributed`);
- extension: :data:`REGISTRY` (name -> :class:`Component`), the hook interface of a mechanism.

Example::

    from unisd_components import PRESETS, TrainingConfig, train_variant
    result = train_variant(model, tok, examples, PRESETS["unisd_star"], TrainingConfig(max_steps=10))
"""

from __future__ import annotations

from unisd_components.config import (
    COMPONENT_NAMES,
    AgreementConfig,
    ClippingConfig,
    ContrastiveConfig,
    EMAConfig,
    FeatureMatchingConfig,
    GKDConfig,
    TrainingConfig,
    VariantConfig,
)
from unisd_components.distributed import init_data_parallel
from unisd_components.lora import apply_lora
from unisd_components.presets import PRESETS, training_for_preset
from unisd_components.registry import REGISTRY, Component
from unisd_components.trainer import NonFiniteLossError, TrainingExample, TrainResult, train_variant

__all__ = [
    "COMPONENT_NAMES",
    "PRESETS",
    "REGISTRY",
    "AgreementConfig",
    "ClippingConfig",
    "Component",
    "ContrastiveConfig",
    "EMAConfig",
    "FeatureMatchingConfig",
    "GKDConfig",
    "NonFiniteLossError",
    "TrainResult",
    "TrainingConfig",
    "TrainingExample",
    "VariantConfig",
    "apply_lora",
    "init_data_parallel",
    "train_variant",
    "training_for_preset",
]
