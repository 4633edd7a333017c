"""Mechanism 5, clipping: cap each token's divergence, statically or at the batch's q-quantile
(math: :func:`unisd_components.divergence.clip_cap`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field

from unisd_components.component import Component
from unisd_components.registry import MechanismConfig, register_mechanism

if TYPE_CHECKING:
    import torch

__all__ = ["ClippingComponent", "ClippingConfig"]


class ClippingConfig(MechanismConfig):
    """Mechanism 5: cap each token's divergence, statically or at a per-batch quantile."""

    mode: Literal["adaptive", "static"] = "adaptive"
    quantile: float = Field(0.99, gt=0, le=1)
    cap: float = Field(10.0, gt=0)


class ClippingComponent(Component):
    """Mechanism 5: cap each token's divergence (static cap or the batch's q-quantile)."""

    name = "clipping"
    config: ClippingConfig

    def transform_divergence(
        self, per_token: torch.Tensor, mask: torch.Tensor, metrics: dict[str, float]
    ) -> torch.Tensor:
        import torch

        from unisd_components.divergence import clip_cap

        if self.config.mode == "static":
            cap = torch.tensor(self.config.cap, dtype=per_token.dtype, device=per_token.device)
        else:
            cap = clip_cap(per_token, mask, self.config.quantile)
            if cap is None:
                return per_token
        with torch.no_grad():
            clipped = (per_token.detach() > cap)[mask.bool()]
            metrics["clip_cap"] = float(cap)
            metrics["clip_frac"] = float(clipped.float().mean()) if clipped.numel() else 0.0
        return torch.minimum(per_token, cap)


register_mechanism(ClippingConfig, ClippingComponent)
