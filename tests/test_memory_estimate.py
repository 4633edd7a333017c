"""The ``--dry-run`` memory estimate per trial (harness.memory_estimate) and its ``--gpu-memory`` check."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import build_parser
from harness.memory_estimate import GB, describe_memory, model_shape, trial_memory
from harness.spec import load_spec
from unisd_components.config import TrainingConfig, VariantConfig
from unisd_components.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]


def test_formula_terms_for_qwen_7b_with_lora():
    shape = model_shape("Qwen/Qwen2.5-7B-Instruct")
    assert shape is not None and shape.vocab == 152_064
    spec = load_spec(REPO / "studies" / "full_ablation.yaml")
    training = TrainingConfig(batch_size=4, max_prompt_tokens=1024, max_completion_tokens=1024)
    fused = trial_memory(shape, VariantConfig(), training, lora=spec.models()[0].lora)
    unfused = trial_memory(
        shape, VariantConfig(), training.model_copy(update={"fused_loss": False}), lora=spec.models()[0].lora
    )
    # Unfused: ~5.4 [B,T,V] fp32 tensors; fused: 8 chunks of 2^24 / V positions, whatever T.
    assert unfused["loss"] == pytest.approx(5.4 * 4 * 1024 * 152_064 * 4)
    assert fused["loss"] == pytest.approx(8 * (2**24 // 152_064) * 152_064 * 4)
    assert fused["weights"] == shape.params * 2 and fused["teacher"] == 0  # LoRA teacher shares the base
    longer = trial_memory(
        shape,
        VariantConfig(),
        training.model_copy(update={"max_completion_tokens": 2048}),
        lora=spec.models()[0].lora,
    )
    assert longer["loss"] == fused["loss"]
    assert fused["total"] == pytest.approx(sum(v for k, v in fused.items() if k != "total"))
    # Full fine-tuning keeps a frozen teacher copy and AdamW state for every weight.
    full = trial_memory(shape, VariantConfig(), training)
    assert full["teacher"] == shape.params * 2 and full["training"] == shape.params * 10
    star = trial_memory(shape, PRESETS["unisd_star"], training, lora=spec.models()[0].lora)
    assert star["teacher_forward"] >= fused["teacher_forward"]


def test_dry_run_says_whether_the_largest_trial_fits():
    spec = load_spec(REPO / "studies" / "full_ablation.yaml")
    roomy = describe_memory(spec, gpu_gb=80)
    assert "largest" in roomy and "fits on 80 GB" in roomy and "NOT" not in roomy
    assert "memory_estimate.py" in roomy
    assert "does NOT fit on 8 GB" in describe_memory(spec, gpu_gb=8)


def test_unknown_model_is_reported_not_guessed(tmp_path):
    assert model_shape(str(tmp_path)) is None
    (tmp_path / "config.json").write_text(
        '{"hidden_size": 64, "vocab_size": 1000, "num_hidden_layers": 2, "intermediate_size": 128,'
        ' "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": true}'
    )
    shape = model_shape(str(tmp_path))
    assert (
        shape is not None
        and shape.kv_width == 32
        and shape.params == 2 * (64 * (64 + 2 * 32) + 64 * 64 + 3 * 64 * 128) + 64_000
    )


def test_gpu_memory_option_parses():
    args = build_parser().parse_args(["run", "x.yaml", "--dry-run", "--gpu-memory", "80"])
    assert args.gpu_memory == 80.0 and args.dry_run
    assert GB == 1024**3
