"""Configuration of a UniSD variant: which mechanisms are on, with which hyperparameters.

A variant is data, not code: a method (``sft``, ``sdft``, ``gkd``) plus, for ``sdft``, any subset of the
five mechanisms, each with its own Pydantic config. The trainer composes whatever is set; a mechanism
whose field is ``None`` is off. Defaults are those of ``unisd-method.md``.

Example::

    from unisd_components.config import VariantConfig, AgreementConfig, EMAConfig
    variant = VariantConfig(agreement=AgreementConfig(k=3), ema=EMAConfig(beta=0.9))
    variant.enabled_components()   # ('agreement', 'ema')
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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


class AgreementConfig(_Strict):
    """Mechanism 1: multi-teacher agreement weights from K extra few-shot contexts."""

    level: Literal["token", "sequence"] = "token"
    k: int = Field(3, ge=2, le=8, description="number of extra teacher contexts")
    strategy: Literal["random", "retrieval", "induction"] = "retrieval"
    gamma: float = Field(1.0, gt=0, description="disagreement sharpness")
    stat: Literal["var", "range"] = "var"
    quantile: float = Field(0.95, gt=0, le=1, description="token level: normaliser quantile of d")
    cap: float = Field(10.0, gt=0, description="token level: cap of the normalised disagreement")
    floor: float = Field(0.01, ge=0, lt=1, description="token level: minimum weight")
    n_shots: int = Field(1, ge=1, le=4, description="donor demonstrations per context")


class ContrastiveConfig(_Strict):
    """Mechanism 2: token-level hinge against a negative (wrong-demonstration) teacher."""

    weight: float = Field(0.1, ge=0, description="lambda_c")
    margin: float = Field(0.5, ge=0)


class EMAConfig(_Strict):
    """Mechanism 3: EMA teacher, phi <- beta*phi + (1-beta)*theta every sync_steps optimizer steps."""

    beta: float = Field(0.9, ge=0, lt=1)
    sync_steps: int = Field(10, ge=1)


class FeatureMatchingConfig(_Strict):
    """Mechanism 4: final-layer hidden-state MSE against the teacher at completion positions."""

    weight: float = Field(0.1, ge=0, description="lambda_f")
    match_repr: bool = Field(False, description="use the feature term alone, without the divergence")


class ClippingConfig(_Strict):
    """Mechanism 5: cap each token's divergence, statically or at a per-batch quantile."""

    mode: Literal["adaptive", "static"] = "adaptive"
    quantile: float = Field(0.99, gt=0, le=1)
    cap: float = Field(10.0, gt=0)


class GKDConfig(_Strict):
    """GKD baseline: generalized JSD with a fraction ``lmbda`` of on-policy student samples."""

    beta: float = Field(0.5, ge=0, le=1, description="JSD interpolation (the divergence alpha)")
    lmbda: float = Field(0.5, ge=0, le=1, description="fraction of batches sampled on-policy")


COMPONENT_NAMES: tuple[str, ...] = ("agreement", "contrastive", "ema", "feature_matching", "clipping")


class VariantConfig(_Strict):
    """One trainable variant. ``method='sdft'`` with no component set is the plain SDFT baseline."""

    method: Literal["sft", "sdft", "gkd"] = "sdft"
    alpha: float = Field(0.0, ge=0, le=1, description="0 forward KL(T||S), 1 reverse KL, else JSD")
    kl_to_base_beta: float = Field(0.0, ge=0, description="beta of the optional k3 regulariser")
    agreement: AgreementConfig | None = None
    contrastive: ContrastiveConfig | None = None
    ema: EMAConfig | None = None
    feature_matching: FeatureMatchingConfig | None = None
    clipping: ClippingConfig | None = None
    gkd: GKDConfig | None = None

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
