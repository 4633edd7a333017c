"""Issue 11 item 4: with several training benchmarks, agreement donors, retrieval neighbours and induced
instructions come from the prompt's own benchmark, never from the pooled set."""

from __future__ import annotations

import re

import numpy as np
import pytest

from unisd_components import contexts, embeddings
from unisd_components.config import AgreementConfig
from unisd_components.registry import AgreementComponent, SetupContext
from unisd_components.trainer import TrainingExample


def _examples() -> list[TrainingExample]:
    out = []
    for bench in ("sci", "code"):
        for i in range(4):
            out.append(
                TrainingExample(
                    id=f"{bench}/{i}",
                    messages=[{"role": "user", "content": f"PROBLEM-{bench}-{i}"}],
                    demonstration=f"DEMO-{bench}-{i}",
                    benchmark=bench,
                )
            )
    return out


class _CrossEmbedder:
    """Puts each example next to its namesake of the OTHER benchmark: pooled retrieval crosses over."""

    def encode(self, texts, **_):
        vectors = []
        for text in texts:
            bench, i = re.search(r"PROBLEM-(\w+)-(\d)", text).groups()
            v = np.zeros(8, dtype=np.float32)
            v[int(i)] = 1.0
            v[4 + (bench == "code")] = 0.05
            vectors.append(v / np.linalg.norm(v))
        return np.stack(vectors)


def _donor_benchmarks(component: AgreementComponent, example_id: str) -> set[str]:
    found = set()
    for context in component._contexts[example_id]:
        found.update(re.findall(r"DEMO-(\w+)-\d", context[-1]["content"]))
    return found


@pytest.mark.parametrize("strategy", ["random", "retrieval"])
def test_donors_come_from_the_prompts_own_benchmark(strategy, tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "load_embedder", lambda device="cpu": _CrossEmbedder())
    examples = _examples()
    component = AgreementComponent(AgreementConfig(k=3, strategy=strategy))
    component.setup(SetupContext(None, None, examples, tmp_path, "m", seed=0))
    for ex in examples:
        assert _donor_benchmarks(component, ex.id) == {ex.benchmark}, ex.id


def test_induced_instructions_are_induced_per_benchmark(tmp_path, monkeypatch):
    seen: list[set[str]] = []

    def fake_induce(model, tokenizer, members, k, cache_dir, model_id, **_):
        benches = {m.benchmark for m in members}
        seen.append(benches)
        return [f"INSTRUCTION-{'/'.join(sorted(benches))}-{j}" for j in range(k)]

    monkeypatch.setattr(contexts, "induce_instructions", fake_induce)
    examples = _examples()
    component = AgreementComponent(AgreementConfig(k=2, strategy="induction"))
    component.setup(SetupContext(None, None, examples, tmp_path, "m", seed=0))
    assert seen == [{"sci"}, {"code"}]
    for ex in examples:
        for context in component._contexts[ex.id]:
            assert f"INSTRUCTION-{ex.benchmark}-" in context[-1]["content"]


def test_a_benchmark_with_one_example_cannot_give_donors(tmp_path):
    examples = _examples()[:5]  # four sci, one code
    component = AgreementComponent(AgreementConfig(k=2, strategy="random"))
    with pytest.raises(ValueError, match="'code' has only one training example"):
        component.setup(SetupContext(None, None, examples, tmp_path, "m", seed=0))


def test_harness_examples_carry_their_benchmark(data_dir):
    from harness.data import load_benchmark

    ex = load_benchmark("scienceqa", "train", data_dir=data_dir, limit=1, seed=0)[0]
    assert ex.to_training_example().benchmark == "scienceqa"
