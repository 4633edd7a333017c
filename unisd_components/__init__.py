"""UniSD: self-distillation of LLMs with five switchable mechanisms, and its baselines (SFT, SDFT, GKD).

A library: nothing here imports the harness. The public surface:

- configuration: :class:`VariantConfig` (method + enabled mechanisms), :class:`TrainingConfig`, the
  per-mechanism configs, :data:`COMPONENT_NAMES`, the named presets :data:`PRESETS`;
- training: :func:`train_variant` with :class:`TrainingExample`, :class:`TrainResult`,
  :class:`NonFiniteLossError`; :func:`apply_lora` for LoRA; :func:`init_data_parallel` for one process
  per GPU under ``accelerate launch`` (see :mod:`unisd_components.distributed`);
- extension: :data:`REGISTRY` (name -> :class:`Component`), the hook interface of a mechanism,
  :func:`register_mechanism` (see :mod:`unisd_components.registry`).

Names are imported on first use, so ``import unisd_components`` (and the configs) never imports torch.

Example::

    from unisd_components import PRESETS, TrainingConfig, train_variant
    result = train_variant(model, tok, examples, PRESETS["unisd_star"], TrainingConfig(max_steps=10))
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Where each public name lives. Imported on first use (PEP 562): the configs and the registry are cheap,
# the trainer pulls in torch and transformers, and the study spec must validate without them.
_LAZY = {
    "COMPONENT_NAMES": "unisd_components.config",
    "AgreementConfig": "unisd_components.config",
    "ClippingConfig": "unisd_components.config",
    "ContrastiveConfig": "unisd_components.config",
    "EMAConfig": "unisd_components.config",
    "FeatureMatchingConfig": "unisd_components.config",
    "GKDConfig": "unisd_components.config",
    "TrainingConfig": "unisd_components.config",
    "VariantConfig": "unisd_components.config",
    "init_data_parallel": "unisd_components.distributed",
    "apply_lora": "unisd_components.lora",
    "PRESETS": "unisd_components.presets",
    "training_for_preset": "unisd_components.presets",
    "REGISTRY": "unisd_components.registry",
    "Component": "unisd_components.component",
    "register_mechanism": "unisd_components.registry",
    "NonFiniteLossError": "unisd_components.trainer",
    "TrainingExample": "unisd_components.trainer",
    "TrainResult": "unisd_components.trainer",
    "train_variant": "unisd_components.trainer",
}

if TYPE_CHECKING:
    from unisd_components.component import Component
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
    from unisd_components.registry import REGISTRY, register_mechanism
    from unisd_components.trainer import NonFiniteLossError, TrainingExample, TrainResult, train_variant


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'unisd_components' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


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
    "register_mechanism",
    "train_variant",
    "training_for_preset",
]
