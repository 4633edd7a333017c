"""Mechanism 1, multi-teacher agreement: weight tokens (or sequences) by how much K few-shot teacher
contexts agree on the sampled completion (math: :mod:`unisd_components.agreement`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from unisd_components.component import Component, ExtraContexts, SetupContext, StepScores
from unisd_components.registry import MechanismConfig, register_mechanism

if TYPE_CHECKING:
    import torch

__all__ = ["AgreementComponent", "AgreementConfig"]


class AgreementConfig(MechanismConfig):
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


class AgreementComponent(Component):
    """Mechanism 1: weight tokens (or sequences) by how much K few-shot teacher contexts agree."""

    name = "agreement"
    config: AgreementConfig

    @classmethod
    def extra_context_count(cls, config: AgreementConfig) -> int:
        return config.k

    def setup(self, ctx: SetupContext) -> None:
        import numpy as np

        from unisd_components import contexts

        cfg = self.config
        embeddings: np.ndarray | None = None
        if cfg.strategy == "retrieval":
            from unisd_components.embeddings import example_embeddings

            embeddings = example_embeddings(ctx.examples, ctx.cache_dir)  # once; rows sliced per benchmark
        self._contexts = {}
        # Donors, neighbours and induced instructions come from the prompt's own benchmark: a ScienceQA
        # question never gets an MBPP donor when several benchmarks train one model.
        for benchmark, rows in contexts.by_benchmark(ctx.examples).items():
            members = [ctx.examples[i] for i in rows]
            if cfg.strategy != "induction" and len(members) < 2:
                raise ValueError(
                    f"agreement donors come from the prompt's own benchmark, and {benchmark!r} has only "
                    "one training example"
                )
            instructions: list[str] | None = None
            if cfg.strategy == "induction":
                instructions = contexts.induce_instructions(
                    ctx.model, ctx.tokenizer, members, cfg.k, ctx.cache_dir, ctx.model_id, seed=ctx.seed
                )
            for i, ex in enumerate(members):
                self._contexts[ex.id] = contexts.fewshot_contexts(
                    i,
                    members,
                    cfg.k,
                    cfg.strategy,
                    ctx.seed,
                    n_shots=cfg.n_shots,
                    embeddings=None if embeddings is None else embeddings[rows],
                    instructions=instructions,
                )

    def extra_contexts(self, examples: Sequence[Any]) -> ExtraContexts:
        per_example = [self._contexts[ex.id] for ex in examples]
        # Agreement is measured at temperature 1 (unisd-method.md, mechanism 1).
        return ExtraContexts([[ctx[j] for ctx in per_example] for j in range(self.config.k)], 1.0)

    def _logps(self, scores: StepScores) -> torch.Tensor:
        return scores.context_token_logps[self.name]

    def token_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        if self.config.level != "token":
            return None
        from unisd_components.agreement import token_agreement_weights

        cfg = self.config
        w = token_agreement_weights(
            self._logps(scores), scores.mask, cfg.gamma, cfg.stat, cfg.quantile, cfg.cap, cfg.floor
        )
        _weight_metrics(w[scores.mask], metrics)
        return w

    def sequence_weights(self, scores: StepScores, metrics: dict[str, float]) -> torch.Tensor | None:
        if self.config.level != "sequence":
            return None
        from unisd_components.agreement import sequence_agreement_weights

        w = sequence_agreement_weights(self._logps(scores), scores.mask, self.config.gamma, self.config.stat)
        _weight_metrics(w, metrics)
        return w


def _weight_metrics(values: torch.Tensor, metrics: dict[str, float]) -> None:
    if values.numel():
        metrics["agreement_weight_mean"] = float(values.mean())
        metrics["agreement_weight_min"] = float(values.min())


register_mechanism(AgreementConfig, AgreementComponent)
