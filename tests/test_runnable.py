"""Every name the spec accepts runs: each benchmark through ``harness eval``, each mechanism one step.

This is the pin against drift between the registries and what exists: a benchmark the spec validates
but that has no loader or no lm-eval task (``gsm8k`` once was), or a mechanism with a config but no
working component, fails here.
"""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.spec import BENCHMARKS, COMPONENT_CONFIGS, MethodSpec
from unisd_components.config import COMPONENT_NAMES, TrainingConfig, VariantConfig


def test_every_accepted_benchmark_is_runnable(tmp_path, data_dir, capsys):
    """``harness eval --model tiny-random:llama --limit 2`` over every benchmark name the spec accepts."""
    from harness.data import BENCHMARKS as RECORDS

    assert set(BENCHMARKS) == set(RECORDS) and len(BENCHMARKS) >= 6
    code = main(
        ["eval", "--model", "tiny-random:llama", "--benchmarks", ",".join(BENCHMARKS), "--limit", "2",
         "--output", str(tmp_path), "--device", "cpu", "--batch-size", "2", "--data-dir", str(data_dir)]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    for name in BENCHMARKS:
        assert 0.0 <= metrics[f"{name}.{RECORDS[name].metric}"] <= 1.0, name
        assert metrics[f"{name}.n"] == 2, name
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert sorted({r["benchmark"] for r in rows}) == sorted(BENCHMARKS)


def test_every_component_name_has_a_spec_section_and_a_config():
    assert tuple(COMPONENT_CONFIGS) == COMPONENT_NAMES
    for name in COMPONENT_NAMES:
        assert name in MethodSpec.model_fields and name in VariantConfig.model_fields


@pytest.mark.parametrize("name", COMPONENT_NAMES)
def test_every_mechanism_trains_one_step(name, tiny_model_and_tokenizer, data_dir, tmp_path):
    """Each mechanism alone, at its default config, through one real optimizer step of the trainer."""
    from harness.data import load_benchmark
    from unisd_components.trainer import train_variant

    model, tok = tiny_model_and_tokenizer
    examples = [
        ex.to_training_example()
        for ex in load_benchmark("scienceqa", "train", data_dir=data_dir, limit=6, seed=0)
    ]
    # One step: the EMA's default period (10) would never sync, which the trainer refuses as inert.
    config = COMPONENT_CONFIGS[name](**({"sync_steps": 1} if name == "ema" else {}))
    variant = VariantConfig(**{name: config})
    training = TrainingConfig(max_steps=1, batch_size=2, max_prompt_tokens=128, max_completion_tokens=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = train_variant(model, tok, examples, variant, training, cache_dir=tmp_path)
    assert result.steps == 1 and variant.enabled_components() == (name,)
    row = result.history[0]
    assert row["loss"] == row["loss"]  # finite (the trainer raises on NaN/inf)
    moved = [n for n, p in model.named_parameters() if not p.detach().equal(before[n])]
    assert moved, f"{name}: one step changed no weight"
