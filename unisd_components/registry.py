"""The mechanism registry: every list of mechanism names in the project derives from it.

A mechanism is one module that declares its config (a :class:`MechanismConfig`) and its
:class:`~unisd_components.component.Component` subclass, and registers them with
:func:`register_mechanism` when imported. From the registry derive ``COMPONENT_NAMES`` and the
``VariantConfig`` fields (:mod:`unisd_components.config`), the study spec's component literal and
sections, the plan's cost model, the tracking columns and the report. A sixth mechanism is one new
module plus one line in :data:`BUILTIN_MODULES` (or, outside this package, its name in
``$UNISD_PLUGINS``, imported with the built-ins in every process); no other edit.

Why the derived structures freeze: ``VariantConfig`` and the spec are Pydantic models built once, at
import. A mechanism registered after they were built would be silently missing from them, so
:func:`register_mechanism` refuses it with a clear error instead.

Nothing here imports torch: the spec validates a study with the registry alone.

Example (a mechanism module)::

    class NoiseConfig(MechanismConfig):
        '''Mechanism 6: ...'''
        scale: float = Field(0.1, ge=0)

    class NoiseComponent(Component):
        name = "noise"
        def loss_terms(self, scores, metrics): ...

    register_mechanism(NoiseConfig, NoiseComponent)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from unisd_components.component import Component, ExtraContexts, SetupContext, StepScores

if TYPE_CHECKING:
    from unisd_components.config import VariantConfig

__all__ = [
    "BUILTIN_MODULES",
    "PLUGINS_ENV",
    "REGISTRY",
    "Component",
    "ExtraContexts",
    "Mechanism",
    "MechanismConfig",
    "SetupContext",
    "StepScores",
    "build_components",
    "mechanisms",
    "register_mechanism",
]

# The five UniSD mechanisms, in their canonical order (unisd-method.md): the order of COMPONENT_NAMES,
# of the VariantConfig fields, of variant names (``unisd[agreement+ema]``) and of report columns.
BUILTIN_MODULES: tuple[str, ...] = (
    "unisd_components.mechanisms.agreement",
    "unisd_components.mechanisms.contrastive",
    "unisd_components.mechanisms.ema",
    "unisd_components.mechanisms.feature_matching",
    "unisd_components.mechanisms.clipping",
)


class MechanismConfig(BaseModel):
    """Base of a mechanism's hyperparameters: frozen, unknown keys refused. Defaults: unisd-method.md."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Mechanism:
    """One registered mechanism: its name (also its ``VariantConfig`` field), config and component."""

    name: str
    config: type[BaseModel]
    component: type[Component]


_MECHANISMS: dict[str, Mechanism] = {}
# name -> component class; the name is also the VariantConfig field that holds its config.
REGISTRY: dict[str, type[Component]] = {}
_state: dict[str, Any] = {"builtins": False, "frozen_by": None}


# Extension modules to import with the built-ins, comma-separated: how a mechanism (or a benchmark, which
# registers with harness.data the same way) defined outside the package reaches every process of a study,
# spawned workers and data-parallel training processes included.
PLUGINS_ENV = "UNISD_PLUGINS"


def _load_builtins() -> None:
    if _state["builtins"]:
        return
    _state["builtins"] = True  # set first: the modules below call register_mechanism while importing
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for module in filter(None, (m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ImportError(f"${PLUGINS_ENV}: cannot import {module!r}: {err}") from err


def register_mechanism(config: type[BaseModel], component: type[Component]) -> Mechanism:
    """Register a mechanism under ``component.name`` (call it at the bottom of the mechanism's module).

    Raises ``ValueError`` for a bad name or a duplicate, ``TypeError`` for a wrong class, and
    ``RuntimeError`` when the derived structures (``VariantConfig``, the spec) are already built.
    """
    _load_builtins()
    name = getattr(component, "name", "")
    if not isinstance(component, type) or not issubclass(component, Component):
        raise TypeError(f"mechanism component must subclass unisd_components.component.Component: {component!r}")
    if not isinstance(config, type) or not issubclass(config, BaseModel):
        raise TypeError(f"mechanism {name!r}: config must be a pydantic model class, got {config!r}")
    if not name.isidentifier() or name.startswith("_") or name in ("method", "alpha", "kl_to_base_beta", "gkd"):
        raise ValueError(f"mechanism name {name!r} must be a lowercase identifier that is not a VariantConfig field")
    if name in _MECHANISMS:
        if _MECHANISMS[name] == Mechanism(name, config, component):
            return _MECHANISMS[name]  # the same module imported twice (e.g. as __main__ and by name)
        raise ValueError(f"mechanism {name!r} is already registered (by {_MECHANISMS[name].component.__module__})")
    if _state["frozen_by"] is not None:
        raise RuntimeError(
            f"mechanism {name!r} registered after {_state['frozen_by']} was built from the registry; "
            "import the mechanism's module before importing unisd_components.config or harness.spec"
        )
    mechanism = Mechanism(name, config, component)
    _MECHANISMS[name] = mechanism
    # Canonical order whatever the import order: built-ins as listed, then the others as registered.
    ordered = sorted(_MECHANISMS.values(), key=_rank)
    _MECHANISMS.clear()
    _MECHANISMS.update((m.name, m) for m in ordered)
    REGISTRY.clear()
    REGISTRY.update((m.name, m.component) for m in ordered)
    return mechanism


def _rank(mechanism: Mechanism) -> int:
    module = mechanism.component.__module__
    if module in BUILTIN_MODULES:
        return BUILTIN_MODULES.index(module)
    return len(BUILTIN_MODULES) + list(_MECHANISMS).index(mechanism.name)


def mechanisms(*, freeze: str | None = None) -> Mapping[str, Mechanism]:
    """Every registered mechanism, in registration order (the built-in five first).

    ``freeze``: the name of a structure now built from the registry; later registrations are refused.
    """
    _load_builtins()
    if freeze is not None and _state["frozen_by"] is None:
        _state["frozen_by"] = freeze
    return MappingProxyType(_MECHANISMS)


def build_components(
    variant: VariantConfig, registry: Mapping[str, type[Component]] | None = None
) -> list[Component]:
    """The enabled components of ``variant``, in registry order."""
    _load_builtins()
    registry = REGISTRY if registry is None else registry
    built = []
    for name, cls in registry.items():
        config = getattr(variant, name, None)
        if config is not None:
            built.append(cls(config))
    return built


def __getattr__(name: str) -> Any:
    # The component classes used to live here; they are in their mechanism modules now.
    for mechanism in mechanisms().values():
        if mechanism.component.__name__ == name:
            return mechanism.component
    raise AttributeError(f"module 'unisd_components.registry' has no attribute {name!r}")


_load_builtins()
