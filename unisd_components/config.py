"""Configuration of a UniSD variant: which mechanisms are on, with which hyperparameters.

A variant is data, not code: a method (``sft``, ``sdft``, ``gkd``) plus, for ``sdft``, any subset of the
registered mechanisms (:mod:`unisd_components.registry`), each with its own Pydantic config declared in
its mechanism module (re-exported here). The trainer composes whatever is set; a mechanism
whose field is ``None`` is off. Defaults are those of ``unisd-method.md``.

Example::

    from unisd_components.config import VariantConfig, AgreementConfig, EMAConfig
    variant = VariantConfig(agreement=AgreementConfig(k=3), ema=EMAConfig(beta=0.9))
    variant.enabled_components()   # ('agreement', 'ema')
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from unisd_components.mechanisms.agreement import AgreementConfig
from unisd_components.mechanisms.clipping import ClippingConfig
from unisd_components.mechanisms.contrastive import ContrastiveConfig
from unisd_components.mechanisms.ema import EMAConfig
from unisd_components.mechanisms.feature_matching import FeatureMatchingConfig
from unisd_components.registry import mechanisms
from unisd_components.strict_numbers import refuse_bool_for_numbers

__all__ = [
    "AgreementConfig",
    "ClippingConfig",
    "COMPONENT_NAMES",
    "ContrastiveConfig",
    "EMAConfig",
    "FeatureMatchingConfig",
    "GKDConfig",
    "TrainingConfig",
    "VariantConfig",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # `max_steps=True` is not one step: no boolean in an int or float field (see strict_numbers)
    _no_bool_numbers = field_validator("*", mode="before")(refuse_bool_for_numbers)


class GKDConfig(_Strict):
    """GKD baseline: generalized JSD with a fraction ``lmbda`` of on-policy student samples."""

    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (the divergence alpha)")
    lmbda: float = Field(0.5, ge=0, le=1, description="fraction of batches sampled on-policy")


# Every mechanism of the registry, in canonical order; each is also the VariantConfig field of its config.
_MECHANISMS = mechanisms(freeze="unisd_components.config (COMPONENT_NAMES, VariantConfig)")
COMPONENT_NAMES: tuple[str, ...] = tuple(_MECHANISMS)


class _VariantBase(_Strict):
    """One trainable variant. ``method='sdft'`` with no component set is the plain SDFT baseline.

    Besides the fields below, one optional field per registered mechanism (``agreement``, ``ema`` ...)
    holds its config; None is off.
    """

    method: Literal["sft", "sdft", "gkd"] = "sdft"
    alpha: float = Field(0.0, ge=0, le=1, description="0 forward KL(T||S), 1 reverse KL, else JSD")
    kl_to_base_beta: float = Field(0.0, ge=0, description="beta of the optional k3 regulariser")

    @model_validator(mode="after")
    def _check_method(self) -> VariantConfig:
        if self.method != "sdft" and self.enabled_components():
            raise ValueError(f"components {list(self.enabled_components())} only apply to method 'sdft'")
        if self.method == "gkd" and self.gkd is None:
            object.__setattr__(self, "gkd", GKDConfig())
        return self

    def enabled_components(self) -> tuple[str, ...]:
        return tuple(name for name in COMPONENT_NAMES if getattr(self, name) is not None)

    @property
    def name(self) -> str:
        if self.method != "sdft":
            return self.method
        enabled = self.enabled_components()
        return "sdft" if not enabled else "unisd[" + "+".join(enabled) + "]"


# The mechanism fields are derived from the registry (then gkd, the baseline's own settings, last).
VariantConfig = create_model(
    "VariantConfig",
    __base__=_VariantBase,
    __module__=__name__,
    __doc__=_VariantBase.__doc__,
    **{name: (m.config | None, None) for name, m in _MECHANISMS.items()},
    gkd=(GKDConfig | None, None),
)


class TrainingConfig(_Strict):
    """How one variant is trained. Defaults are the method contract's (unisd-method.md section 1) except
    the CPU-sized ``grad_accum`` (1, contract 4) and ``max_completion_tokens`` (64, contract 2048); a GPU
    study states every value it relies on."""

    max_steps: int | None = Field(None, ge=1, description="optimizer steps; None: one pass (epochs)")
    epochs: float = Field(1.0, gt=0)
    batch_size: int = Field(4, ge=1, description="per-device prompts per micro-batch (the contract's 4)")
    grad_accum: int = Field(
        1, ge=1, description="micro-batches per optimizer step; CPU-sized default 1, the method contract's 4"
    )
    learning_rate: float = Field(2e-5, gt=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_prompt_tokens: int = Field(1024, ge=8)
    max_completion_tokens: int = Field(
        64, ge=1, description="CPU-sized default 64; the method contract's 2048 (short tasks need far less)"
    )
    temperature: float = Field(0.7, gt=0, description="sampling temperature")
    loss_temperature: float | None = Field(None, gt=0, description="None: the sampling temperature")
    skip_first_tokens: int = Field(0, ge=0)
    seed: int = 0
    gradient_checkpointing: bool = False
    fused_loss: bool = Field(
        True, description="LM head + divergence chunk by chunk, no [B,T,V] tensor; false: unfused reference"
    )
    fused_chunk_tokens: int | None = Field(
        None, ge=1, description="completion positions per fused chunk; None: about 16M logits per chunk"
    )
